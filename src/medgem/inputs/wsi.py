"""Whole-slide pathology images -> the patches MedGemma 1.5 reads (through OpenSlide).

Reproduces google-health/medgemma, notebooks/high_dimensional_pathology_hugging_face.ipynb:
1. the pyramid level nearest 10x: `slide.get_level_by_pixel_spacing(FromMagnificationString("10X"))`
   (ez_wsi_dicomweb: 10x is 1 micron per pixel; 20x 0.5, 40x 0.25), here the level whose microns per
   pixel (level 0's openslide.mpp-x times its downsample) is nearest 1.0 on a log scale;
2. tissue only: ez_wsi's patch generator keeps patches over its tissue mask. Here the mask is Otsu's
   threshold on the HSV saturation of the slide's smallest level (stained tissue is saturated, glass
   and background are near white or grey), and a patch is tissue when at least TISSUE_FRACTION of it is;
3. non-overlapping 896 px patches (`patch_size=896, stride_size=896`);
4. at most 125, `random.sample`-d (seeded here), kept in spatial order (row by row), no per-patch label.

Patches are read one at a time with `read_region`, so a full-resolution level is never in memory.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medgem.errors import InputError
from medgem.inputs.dicom import check_regular_file, source_name

logger = logging.getLogger(__name__)

MPP_10X = 1.0
PATCH = 896
MAX_PATCHES = 125
TISSUE_FRACTION = 0.25  # of a patch's area, on the mask
MASK_SIDE = 2048  # the mask's longest side at most (a thumbnail when the smallest level is larger)


@dataclass
class SlidePatches:
    """The patches a wsi recipe sends: images in spatial order, their level-0 (x, y) corners, the level
    they come from and its microns per pixel, and how many tissue patches the level has in all."""

    images: list[Image.Image]
    corners: list[tuple[int, int]]
    level: int
    mpp: float
    tissue_patches: int


def _open(path: Path):
    import openslide

    name = source_name(path)
    check_regular_file(path)
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:  # includes OpenSlideUnsupportedFormatError
        raise InputError(f"{name}: not a whole-slide image OpenSlide reads ({type(exc).__name__})") from None


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


def _rgb(region: Image.Image) -> Image.Image:
    """RGBA from OpenSlide (transparent outside the scanned area) on white, as glass looks."""
    white = Image.new("RGB", region.size, (255, 255, 255))
    white.paste(region.convert("RGB"), mask=region.getchannel("A") if region.mode == "RGBA" else None)
    return white


def load_patches(path: str | os.PathLike[str], max_patches: int = MAX_PATCHES, seed: int = 0) -> SlidePatches:
    """A slide's tissue patches at ~10x (see the module docstring); InputError for an unreadable slide,
    one without microns per pixel, or one with no tissue."""
    import openslide

    path = Path(path)
    name = source_name(path)
    if max_patches < 1:
        raise InputError(f"the number of patches must be at least 1 (got {max_patches})")
    slide = _open(path)
    try:
        try:
            mpp0 = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        except (KeyError, ValueError):
            raise InputError(f"{name}: the slide does not say its microns per pixel, so its 10x level is "
                             "unknown") from None
        if not (math.isfinite(mpp0) and mpp0 > 0):
            raise InputError(f"{name}: the slide's microns per pixel is not a positive number")
        downsamples = [float(d) for d in slide.level_downsamples]
        level = nearest_level(mpp0, downsamples)
        width, height = slide.level_dimensions[level]
        small = slide.level_count - 1
        try:
            mask_image = slide.get_thumbnail((MASK_SIDE, MASK_SIDE)) if max(slide.level_dimensions[small]) > \
                MASK_SIDE else _rgb(slide.read_region((0, 0), small, slide.level_dimensions[small]))
            mask = tissue_mask(np.asarray(mask_image.convert("RGB")))
            cells = _tissue_cells(mask, slide.level_dimensions[0], downsamples[level], width, height)
            if not cells:
                raise InputError(f"{name}: no tissue found (no {PATCH} px patch at ~10x is at least "
                                 f"{TISSUE_FRACTION:.0%} stained tissue)")
            chosen = sorted(random.Random(seed).sample(cells, k=min(max_patches, len(cells))))
            scale = downsamples[level]
            corners = [(round(col * PATCH * scale), round(row * PATCH * scale)) for row, col in chosen]
            images = [_rgb(slide.read_region(corner, level, (PATCH, PATCH))) for corner in corners]
        except openslide.OpenSlideError as exc:
            raise InputError(f"{name}: the slide is truncated or corrupt ({type(exc).__name__})") from None
    finally:
        slide.close()
    logger.debug("slide: level %d (%.2f um/px), %d of %d tissue patches", level, mpp0 * downsamples[level],
                 len(images), len(cells))
    return SlidePatches(images, corners, level, mpp0 * downsamples[level], len(cells))


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
