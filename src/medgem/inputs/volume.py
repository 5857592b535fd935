"""CT and MRI volumes -> the slice images MedGemma 1.5 was trained on.

MedGemma 1.5 reads a volume as up to 85 axial slices, each an 8-bit RGB image, in patient order.
What each step reproduces (google-health/medgemma, notebooks/high_dimensional_ct_hugging_face.ipynb
and high_dimensional_ct_model_garden.ipynb, January 2026):

1. order: the notebook sorts instances by InstanceNumber. Here the geometry wins when every slice has
   it (ImagePositionPatient projected on the slice normal, medgem.inputs.dicom.sort_slices), because
   InstanceNumber is only the scanner's numbering; InstanceNumber is the fallback;
2. HU: `pydicom.pixels.apply_rescale(dcm.pixel_array, dcm)`, float64 (RescaleSlope/Intercept, per frame
   for enhanced multi-frame objects);
3. slices: "Sample 85 slices uniformly across CT volume": with n > 85 slices, slice
   `int(round(i / 85 * (n - 1)))` for i = 1..85 (Python's round, half to even; the first slice is
   never taken, the last always is); n <= 85 keeps every slice;
4. CT colours: R = clip(HU, -1024, 1024) (wide), G = clip(HU, -135, 215) (soft tissue),
   B = clip(HU, 0, 80) (brain), each `(clip - low) / (high - low) * 255` in float32, then
   `np.round(., 0).astype(np.uint8)`;
5. MRI (model card, technical report arXiv 2604.05081): one min-max over the whole volume, the same
   value in R, G and B, rounded as above.

The notebook sends the slices as JPEG data URIs; medgem keeps them lossless. The prompt layout (text
first, each slice followed by `SLICE n`, then the question) is processing/recipes.py. The model was
trained on axial volumes with uniform spacing, so other volumes load with a warning, not an error.
Sources: a DICOM series folder, one (enhanced) multi-frame DICOM file, or a NIfTI file (nibabel).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from tqdm import tqdm

from medgem.errors import InputError
from medgem.inputs import dicom
from medgem.inputs.dicom import TooLargeError, source_name

logger = logging.getLogger(__name__)

MAX_SLICES = 85  # the notebook's MAX_SLICE: 85 x 256 image tokens = 21,760
CT_WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))  # R wide, G soft tissue, B brain (HU)
VOLUME_RECIPES = ("ct", "mri")
MODALITY = {"ct": "CT", "mri": "MR"}
# The most voxels a volume may declare (a 1024 x 1024 x 1900 series); one slice at a time is decoded.
MAX_VOLUME_VOXELS = 2_000_000_000
MAX_SLICE_PIXELS = 40_000_000  # per slice, as dicom.MAX_INFLATED_BYTES allows
AXIAL_TOLERANCE_DEG = 10.0  # gantry tilt up to this many degrees still counts as axial
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """The slices a recipe sends, with where they came from.

    indices: 0-based position of each image in the sorted volume; positions: mm along the slice
    normal (None without geometry); total: slices in the volume; warnings: why the volume may differ
    from what the model was trained on (also logged)."""

    images: list[Image.Image]
    indices: list[int]
    positions: list[float | None]
    total: int
    recipe: str
    sorted_by: str
    warnings: list[str] = field(default_factory=list)


def uniform_indices(total: int, max_slices: int = MAX_SLICES) -> list[int]:
    """The notebook's slice rule (step 3 of the module docstring)."""
    if max_slices < 1:
        raise InputError(f"the number of slices must be at least 1 (got {max_slices})")
    if total <= max_slices:
        return list(range(total))
    return [int(round(i / max_slices * (total - 1))) for i in range(1, max_slices + 1)]


def _norm(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The notebook's `norm`: clip, then float32 (x - low) / (high - low) * 255."""
    out = np.clip(values, low, high).astype(np.float32)
    out -= low
    out /= high - low
    out *= 255.0
    return out


def ct_rgb(hu: np.ndarray) -> np.ndarray:
    """HU [H, W] -> uint8 [H, W, 3]: the three windows of CT_WINDOWS (step 4)."""
    return np.round(np.stack([_norm(hu, low, high) for low, high in CT_WINDOWS], axis=-1), 0).astype(np.uint8)


def mri_rgb(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """MR values [H, W] -> uint8 [H, W, 3] grey, scaled by the whole volume's min..max (step 5)."""
    grey = np.round(_norm(values, low, high), 0).astype(np.uint8) if high > low else np.zeros(values.shape, np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass
class _Slices:
    """A sorted volume whose slices decode one at a time: read(i) -> values (HU for CT), float64 [H, W]."""

    total: int
    read: Callable[[int], np.ndarray]
    positions: list[float | None]
    normal: np.ndarray | None
    sorted_by: str
    modality: str | None  # None: the file does not say (NIfTI)


def _check_size(name: str, rows: float, columns: float, slices: int) -> None:
    if rows * columns > MAX_SLICE_PIXELS:
        raise TooLargeError(f"{name}: a slice has {rows * columns / 1e6:.1f} megapixels; the limit is "
                            f"{MAX_SLICE_PIXELS / 1e6:.0f}")
    if rows * columns * slices > MAX_VOLUME_VOXELS:
        raise TooLargeError(f"{name}: the volume has {rows * columns * slices / 1e9:.2f} billion voxels; the "
                            f"limit is {MAX_VOLUME_VOXELS / 1e9:.0f}")


def _grey_only(ds: Dataset, name: str) -> None:
    if dicom.is_colour(ds):
        raise InputError(f"{name}: the volume is stored as colour ({ds.get('PhotometricInterpretation')}); "
                         "CT and MRI recipes need greyscale slices")


def _from_series(folder: Path, series: str | None, progress: bool) -> _Slices:
    name = source_name(folder)
    headers, method = dicom.read_series(folder, progress=progress, series=series)
    if len(headers) == 1 and dicom.frame_count(headers[0]) > 1:
        return _from_multiframe(Path(headers[0].filename))
    first = headers[0]
    _grey_only(first, name)
    _check_size(name, dicom.header_number(first, first.Rows, "Rows"),
                dicom.header_number(first, first.Columns, "Columns"), len(headers))
    geometry = [dicom.slice_geometry(ds) for ds in headers]
    positions = [None if g is None else float(np.dot(*g)) for g in geometry]

    def read(i: int) -> np.ndarray:
        ds = dicom.read_dicom(headers[i].filename)
        where = source_name(headers[i].filename)
        _grey_only(ds, where)
        dicom.check_pixels(ds, where, MAX_SLICE_PIXELS)
        return dicom.modality_values(ds, dicom.decode_frame(ds, 0, where), 0, np.float64)

    normal = geometry[0][1] if geometry[0] is not None else None
    return _Slices(len(headers), read, positions, normal, method, first.get("Modality"))


def _from_multiframe(path: Path) -> _Slices:
    """An (enhanced) multi-frame CT/MR object: frames sorted by their own plane positions."""
    name = source_name(path)
    ds = dicom.read_dicom(path)
    _grey_only(ds, name)
    total = dicom.frame_count(ds)
    _check_size(name, dicom.header_number(ds, ds.Rows, "Rows"), dicom.header_number(ds, ds.Columns, "Columns"),
                total)
    geometry = [dicom.slice_geometry(ds, i) for i in range(total)]
    if all(g is not None for g in geometry):
        keys = [float(np.dot(*g)) for g in geometry]  # type: ignore[misc]
        order = sorted(range(total), key=lambda i: keys[i])
        positions: list[float | None] = [keys[i] for i in order]
        method, normal = "ImagePositionPatient", geometry[0][1]  # type: ignore[index]
    else:
        order, positions, method, normal = list(range(total)), [None] * total, "frame order", None

    def read(i: int) -> np.ndarray:
        frame = order[i]
        return dicom.modality_values(ds, dicom.decode_frame(ds, frame, name), frame, np.float64)

    return _Slices(total, read, positions, normal, method, ds.get("Modality"))


def _from_nifti(path: Path) -> _Slices:
    """A 3-D NIfTI volume, reoriented to RAS+ (nibabel.as_closest_canonical) so axis 2 runs foot to head;
    each slice is shown as a DICOM viewer shows an axial slice (patient's right on the left, anterior up)."""
    import nibabel as nib

    name = source_name(path)
    dicom.check_regular_file(path)
    try:
        image = nib.as_closest_canonical(nib.load(path))
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib each raise their own: one line for all
        raise InputError(f"{name}: not a readable NIfTI file ({type(exc).__name__})") from None
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{name}: a volume recipe needs a 3-D NIfTI image (this one has {len(shape)} dimensions)")
    _check_size(name, shape[1], shape[0], shape[2])
    affine = image.affine
    normal = affine[:3, 2] / (np.linalg.norm(affine[:3, 2]) or 1.0)
    positions: list[float | None] = [float(np.dot(affine[:3, :3] @ [0, 0, k] + affine[:3, 3], normal))
                                     for k in range(shape[2])]
    proxy = image.dataobj

    def read(k: int) -> np.ndarray:
        try:
            plane = np.asarray(proxy[:, :, k] if len(image.shape) == 3 else proxy[:, :, k, 0], dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - gzip, zlib and nibabel truncation errors: one line for all
            raise InputError(f"{name}: the NIfTI data is truncated or corrupt ({type(exc).__name__})") from None
        return np.ascontiguousarray(plane[::-1, ::-1].T)  # [x, y] in RAS -> rows anterior..posterior

    return _Slices(shape[2], read, positions, normal, "NIfTI affine", None)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _geometry_warnings(volume: _Slices) -> list[str]:
    """Why this volume is unlike the axial, evenly spaced ones MedGemma 1.5 learned from."""
    notes = []
    if volume.normal is not None:
        tilt = float(np.degrees(np.arccos(min(1.0, abs(float(volume.normal[2]))))))
        if tilt > AXIAL_TOLERANCE_DEG:
            notes.append(f"the slices are not axial (their normal is {tilt:.0f} degrees from the head-foot axis); "
                         "MedGemma 1.5 was trained on axial volumes")
    known = [p for p in volume.positions if p is not None]
    if len(known) == volume.total and volume.total > 2:
        gaps = np.diff(np.asarray(known))
        median = float(np.median(gaps))
        if float(gaps.min()) <= 1e-3:
            notes.append("some slices share one position (a repeated or overlapping acquisition?)")
        elif float(gaps.max() - gaps.min()) > max(0.05, 0.05 * median):
            notes.append(f"the slice spacing is uneven ({gaps.min():.2f} to {gaps.max():.2f} mm, median "
                         f"{median:.2f} mm); MedGemma 1.5 was trained on evenly spaced slices")
    elif volume.sorted_by not in ("ImagePositionPatient", "NIfTI affine"):
        notes.append(f"the slices carry no usable ImagePositionPatient; they are ordered by {volume.sorted_by}")
    return notes


def load_volume(path: str | os.PathLike[str], recipe: str = "ct", max_slices: int = MAX_SLICES,
                series: str | None = None, *, budget: Callable[[int], None] | None = None,
                progress: bool = False) -> Volume:
    """A CT or MR volume as MedGemma 1.5's slice images (see the module docstring for each step).

    path: a DICOM series folder (`series` picks one SeriesInstanceUID when it holds several), one
    multi-frame DICOM file, or a .nii/.nii.gz file. recipe: "ct" (three HU windows as RGB) or "mri"
    (whole-volume min-max grey). At most `max_slices` slices, chosen by the notebook's rule.
    `budget(n_slices)` runs once the headers are read and before any pixel is decoded, so that a
    volume the model cannot take is refused before the work (Pipeline.check_budget).
    """
    if recipe not in VOLUME_RECIPES:
        raise InputError(f"unknown volume recipe {recipe!r}; choose one of: {', '.join(VOLUME_RECIPES)}")
    path = Path(path)
    name = source_name(path)
    if path.is_dir():
        source = _from_series(path, series, progress)
    elif series is not None:
        raise InputError("--series picks a series in a folder; this input is one file")
    elif _is_nifti(path):
        source = _from_nifti(path)
    else:
        source = _from_multiframe(path)
    if source.modality is not None and source.modality != MODALITY[recipe]:
        other = next((r for r, m in MODALITY.items() if m == source.modality), None)
        hint = f"; use the {other} recipe" if other else ""
        raise InputError(f"{name}: the {recipe} recipe needs a {MODALITY[recipe]} volume (this one is "
                         f"{source.modality}){hint}")
    chosen = uniform_indices(source.total, max_slices)
    if budget is not None:
        budget(len(chosen))
    notes = _geometry_warnings(source)
    for note in notes:
        logger.warning("%s: %s", name, note)
    steps = tqdm(total=source.total if recipe == "mri" else len(chosen), desc="reading slices", unit="slice",
                 disable=not progress)
    with steps:
        if recipe == "ct":
            images = []
            for i in chosen:
                images.append(Image.fromarray(ct_rgb(source.read(i)), "RGB"))
                steps.update()
        else:
            kept, low, high = {}, np.inf, -np.inf
            wanted = set(chosen)
            for i in range(source.total):  # min..max over every slice, keeping only the chosen ones
                values = source.read(i)
                low, high = min(low, float(values.min())), max(high, float(values.max()))
                if i in wanted:
                    kept[i] = values
                steps.update()
            images = [Image.fromarray(mri_rgb(kept[i], low, high), "RGB") for i in chosen]
    logger.debug("volume: %d of %d slice(s), recipe %s, sorted by %s", len(chosen), source.total, recipe,
                 source.sorted_by)
    return Volume(images, chosen, [source.positions[i] for i in chosen], source.total, recipe, source.sorted_by,
                  notes)


# -- uploads: a zip of a series, or several DICOM files -------------------------------------------------
MAX_ARCHIVE_FILES = 4096
MAX_ARCHIVE_BYTES = 2 * 2**30  # inflated


@contextmanager
def series_folder(files: Sequence[bytes] | None = None, archive: bytes | None = None) -> Iterator[Path]:
    """A temporary folder holding an uploaded series (several DICOM files, or one zip of them), removed
    afterwards. The zip is checked from its directory (file count, inflated size) before anything is
    written, and its member names are never used as paths (a zip may hold '../' names)."""
    with tempfile.TemporaryDirectory(prefix="medgem-series-") as tmp:
        folder = Path(tmp)
        if archive is not None:
            _unzip(archive, folder)
        for i, data in enumerate(files or ()):
            (folder / f"slice{i:05d}.dcm").write_bytes(data)
        yield folder


def _unzip(archive: bytes, folder: Path) -> None:
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_ARCHIVE_FILES:
                raise TooLargeError(f"the series archive holds {len(members)} files; the limit is {MAX_ARCHIVE_FILES}")
            inflated = sum(m.file_size for m in members)
            if inflated > MAX_ARCHIVE_BYTES:
                raise TooLargeError(f"the series archive inflates to {inflated / 2**30:.1f} GiB; the limit is "
                                    f"{MAX_ARCHIVE_BYTES / 2**30:.0f}")
            for i, member in enumerate(members):
                with zf.open(member) as src, open(folder / f"member{i:05d}", "wb") as dest:
                    budget = member.file_size + 1  # a lying directory entry stops here
                    while chunk := src.read(min(1 << 20, budget)):
                        budget -= len(chunk)
                        if budget <= 0:
                            raise TooLargeError("the series archive inflates past what its directory declares")
                        dest.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, zlib.error) as exc:
        raise InputError(f"the series archive is not a readable zip file ({type(exc).__name__})") from None
