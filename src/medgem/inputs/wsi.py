"""Whole-slide pathology images -> the patches MedGemma 1.5 reads (OpenSlide files and DICOM WSI).

Reproduces google-health/medgemma, notebooks/high_dimensional_pathology_hugging_face.ipynb:
1. the pyramid level nearest 10x: `slide.get_level_by_pixel_spacing(FromMagnificationString("10X"))`
   (ez_wsi_dicomweb: 10x is 1 micron per pixel; 20x 0.5, 40x 0.25), here the level whose microns per
   pixel (level 0's times its downsample) is nearest 1.0 on a log scale;
2. tissue only: ez_wsi's patch generator keeps patches over its tissue mask. Here the mask is Otsu's
   threshold on the HSV saturation of the slide's smallest level (stained tissue is saturated, glass
   and background are near white or grey), and a patch is tissue when at least TISSUE_FRACTION of it is;
3. non-overlapping 896 px patches (`patch_size=896, stride_size=896`);
4. at most 125, `random.sample`-d (seeded here), kept in spatial order (row by row), no per-patch label.

Two readers behind one small interface: OpenSlide (.svs, .ndpi, .mrxs, pyramidal TIFF) and `wsidicom`
(a DICOM WSI: a folder of the slide's level files, or one such file), as the notebook reads DICOM
slides through ez_wsi_dicomweb. The mask is read in bands and each patch on its own, so neither a
full-resolution level nor the whole smallest level is ever in memory.
"""

from __future__ import annotations

import logging
import math
import os
import random
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medgem.errors import InputError
from medgem.inputs.dicom import check_regular_file, is_dicom, missing_path, source_name
from medgem.inputs.images import composite_on_white

logger = logging.getLogger(__name__)

MPP_10X = 1.0
PATCH = 896
MAX_PATCHES = 125
TISSUE_FRACTION = 0.25  # of a patch's area, on the mask
MASK_SIDE = 2048  # the mask's longest side at most (the smallest level, scaled down when larger)
BAND_PIXELS = 4 * 2**20  # the smallest level is read this many pixels at a time for the mask


@dataclass
class SlidePatches:
    """The patches a wsi recipe sends: images in spatial order, their level-0 (x, y) corners, the level
    they come from and its microns per pixel, and how many tissue patches the level has in all."""

    images: list[Image.Image]
    corners: list[tuple[int, int]]
    level: int
    mpp: float
    tissue_patches: int


@dataclass
class _Slide:
    """What load_patches needs from a reader: level 0's microns per pixel, each level's size and
    downsample, `read(level, x, y, width, height)` of an RGB region in that level's pixels, and the
    errors a damaged file raises while reading."""

    mpp0: float | None
    sizes: list[tuple[int, int]]
    downsamples: list[float]
    read: Callable[[int, int, int, int, int], Image.Image]
    close: Callable[[], None]
    read_errors: tuple[type[BaseException], ...]


def _open_openslide(path: Path, name: str) -> _Slide:
    import openslide

    check_regular_file(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:  # includes OpenSlideUnsupportedFormatError
        raise InputError(f"{name}: not a whole-slide image OpenSlide reads ({type(exc).__name__})") from None
    try:
        mpp0: float | None = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        mpp0 = None
    downsamples = [float(d) for d in slide.level_downsamples]

    def read(level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        corner = (round(x * downsamples[level]), round(y * downsamples[level]))  # OpenSlide takes level 0's
        return composite_on_white(slide.read_region(corner, level, (width, height)))

    return _Slide(mpp0, [tuple(d) for d in slide.level_dimensions], downsamples, read, slide.close,
                  (openslide.OpenSlideError, OSError, ValueError))


def _dicom_files(path: Path, name: str) -> list[Path]:
    """The regular files of a DICOM WSI folder (a FIFO would block the reader), or the one file."""
    if not path.is_dir():
        check_regular_file(path)
        return [path]
    files = sorted(p for p in path.iterdir() if stat.S_ISREG(p.stat().st_mode))
    if not files:
        raise InputError(f"{name}: the folder holds no files")
    return files


def _open_dicom(path: Path, name: str) -> _Slide:
    from pydicom.errors import InvalidDicomError
    from wsidicom import WsiDicom
    from wsidicom.errors import (
        WsiDicomError,
        WsiDicomFileError,
        WsiDicomNotFoundError,
        WsiDicomNotSupportedError,
    )

    files = _dicom_files(path, name)
    try:  # Paths, never strings: wsidicom would fetch a string that looks like a URL
        slide = WsiDicom.open(files)
    except (WsiDicomNotFoundError, WsiDicomNotSupportedError):
        raise InputError(f"{name}: holds no DICOM whole-slide image (VL Whole Slide Microscopy)") from None
    except (WsiDicomError, WsiDicomFileError, InvalidDicomError, OSError, EOFError, ValueError, KeyError,
            AttributeError) as exc:
        raise InputError(f"{name}: not a readable DICOM whole-slide image ({type(exc).__name__})") from None
    levels = list(slide.levels)
    width0 = levels[0].size.width
    mpp = levels[0].mpp
    numbers = [lv.level for lv in levels]

    def read(level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        return slide.read_region((x, y), numbers[level], (width, height)).convert("RGB")

    return _Slide(None if mpp is None else float(mpp.width), [(lv.size.width, lv.size.height) for lv in levels],
                  [width0 / lv.size.width for lv in levels], read, slide.close,
                  (WsiDicomError, WsiDicomFileError, OSError, EOFError, ValueError, KeyError, IndexError))


def _open(path: Path) -> _Slide:
    """The reader for `path`: wsidicom for a folder or a DICOM file, OpenSlide for anything else."""
    name = source_name(path)
    if not path.exists():
        raise InputError(f"{missing_path(path)}: no such file")
    if path.is_dir():
        return _open_dicom(path, name)
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise InputError(f"{name}: cannot read the file ({type(exc).__name__})") from None
    return _open_dicom(path, name) if is_dicom(head) else _open_openslide(path, name)


@contextmanager
def slide_file(data: bytes) -> Iterator[Path]:
    """An uploaded single-file slide (.svs, .ndpi, pyramidal TIFF: OpenSlide tells them by content) in a
    temporary file, removed afterwards; a DICOM WSI upload goes through volume.series_folder instead."""
    with tempfile.TemporaryDirectory(prefix="medgem-slide-") as tmp:
        path = Path(tmp) / "slide.tiff"
        path.write_bytes(data)
        yield path


def nearest_level(mpp0: float, downsamples: list[float], target: float = MPP_10X) -> int:
    """The level whose microns per pixel is nearest `target` (ratio, not difference: 0.5 and 2 tie)."""
    return min(range(len(downsamples)), key=lambda i: abs(math.log(mpp0 * downsamples[i] / target)))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of stained tissue: HSV saturation above Otsu's threshold; all False on a blank slide."""
    from skimage.filters import threshold_otsu

    saturation = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1].astype(np.float32)
    if float(saturation.max() - saturation.min()) < 8.0:  # one colour: no tissue to separate
        return np.zeros(saturation.shape, dtype=bool)
    return saturation > threshold_otsu(saturation)


def _mask_image(slide: _Slide) -> Image.Image:
    """The smallest level, at most MASK_SIDE on its longest side, read in bands of BAND_PIXELS."""
    small = len(slide.sizes) - 1
    width, height = slide.sizes[small]
    scale = min(1.0, MASK_SIDE / max(width, height))
    out = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), (255, 255, 255))
    band = max(1, BAND_PIXELS // width)
    for top in range(0, height, band):
        rows = min(band, height - top)
        region = slide.read(small, 0, top, width, rows)
        y0, y1 = round(top * scale), round((top + rows) * scale)
        if y1 > y0:
            out.paste(region.resize((out.width, y1 - y0), Image.Resampling.BOX), (0, y0))
    return out


def load_patches(path: str | os.PathLike[str], max_patches: int = MAX_PATCHES, seed: int = 0,
                 budget: Callable[[int], None] | None = None) -> SlidePatches:
    """A slide's tissue patches at ~10x (see the module docstring); InputError for an unreadable slide,
    one without microns per pixel, one with no tissue, or a damaged level. `budget(n_patches)` runs once
    the patches are chosen, before any is read, and may refuse."""
    path = Path(path)
    name = source_name(path)
    if max_patches < 1:
        raise InputError(f"the number of patches must be at least 1 (got {max_patches})")
    slide = _open(path)
    try:
        if slide.mpp0 is None:
            raise InputError(f"{name}: the slide does not say its microns per pixel, so its 10x level is unknown")
        if not (math.isfinite(slide.mpp0) and slide.mpp0 > 0):
            raise InputError(f"{name}: the slide's microns per pixel is not a positive number")
        level = nearest_level(slide.mpp0, slide.downsamples)
        width, height = slide.sizes[level]
        try:
            mask = tissue_mask(np.asarray(_mask_image(slide)))
            cells = _tissue_cells(mask, slide.sizes[0], slide.downsamples[level], width, height)
            if not cells:
                raise InputError(f"{name}: no tissue found (no {PATCH} px patch at ~10x is at least "
                                 f"{TISSUE_FRACTION:.0%} stained tissue)")
            chosen = sorted(random.Random(seed).sample(cells, k=min(max_patches, len(cells))))
            if budget:
                budget(len(chosen))
            images = [slide.read(level, col * PATCH, row * PATCH, PATCH, PATCH) for row, col in chosen]
        except slide.read_errors as exc:
            raise InputError(f"{name}: the slide is truncated or corrupt ({type(exc).__name__})") from None
    finally:
        slide.close()
    scale = slide.downsamples[level]
    corners = [(round(col * PATCH * scale), round(row * PATCH * scale)) for row, col in chosen]
    mpp = slide.mpp0 * scale
    logger.debug("slide: level %d (%.2f um/px), %d of %d tissue patches", level, mpp, len(images), len(cells))
    return SlidePatches(images, corners, level, mpp, len(cells))


def _tissue_cells(mask: np.ndarray, size0: tuple[int, int], downsample: float, width: int,
                  height: int) -> list[tuple[int, int]]:
    """(row, col) of the level's whole PATCH-px cells that are at least TISSUE_FRACTION tissue on the mask."""
    mask_h, mask_w = mask.shape
    sx, sy = mask_w / size0[0], mask_h / size0[1]  # mask pixels per level-0 pixel
    cells = []
    for row in range(height // PATCH):
        for col in range(width // PATCH):
            x0, y0 = col * PATCH * downsample, row * PATCH * downsample
            x1, y1 = x0 + PATCH * downsample, y0 + PATCH * downsample
            window = mask[int(y0 * sy):max(int(y0 * sy) + 1, int(y1 * sy)),
                          int(x0 * sx):max(int(x0 * sx) + 1, int(x1 * sx))]
            if window.size and float(window.mean()) >= TISSUE_FRACTION:
                cells.append((row, col))
    return cells
