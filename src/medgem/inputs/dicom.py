"""DICOM files and series -> 8-bit RGB PIL images, the way a radiologist's viewer would show them.

The model was trained on rendered images, not raw detector counts, so every frame goes through the
display pipeline of PS3.3 C.11 / PS3.4 N.2 before it reaches the image processor:

1. decode the stored pixels (pydicom; JPEG, JPEG 2000 and RLE through Pillow and pydicom itself);
2. Modality LUT: RescaleSlope/RescaleIntercept (Hounsfield units for CT) or a Modality LUT Sequence;
3. VOI: a named CT window preset or "C/W" if asked, else the file's VOI LUT or Window Center/Width,
   else the min..max of the data (a series shares one range so slices stay comparable);
4. MONOCHROME1 inverted so that high attenuation is bright (lungs dark on a chest radiograph);
5. projection radiographs (CR/DX) flipped to the standard display orientation from PatientOrientation;
6. quantised to 8 bits and returned as RGB at native resolution (an optional `size` shrinks previews).

Colour images (RGB, YBR_*, PALETTE COLOR) skip steps 2-4. Enhanced multi-frame objects keep rescale,
window and position per frame in functional groups; those are read too. Messages and logs never quote
header values: they may identify a patient (see medgem.inputs.deid).
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
import pydicom.filereader
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm import tqdm

from medgem.errors import InputError

logger = logging.getLogger(__name__)

# CT display windows as (center, width) in Hounsfield units. These are the usual radiology values:
# lung -600/1500 (air-filled parenchyma), mediastinum 50/350 (soft tissue and vessels of the chest),
# bone 400/1800, brain 40/80 (grey/white matter), abdomen 40/400 (liver, bowel, fat planes).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}

# How many representative slices of a series (or frames of a cine) to send when the caller does
# not say. Each image costs the model 256 tokens, so this is a budget, never a cap: pass any N.
DEFAULT_SLICES = 8
# The most a deflated dataset may inflate to: a 16-bit 40 Mpx image, plus headers.
MAX_INFLATED_BYTES = 40_000_000 * 2 + 16 * 2**20

Window = str | tuple[float, float] | None
DicomSource = str | os.PathLike[str] | bytes | BinaryIO

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
_RADIOGRAPHS = {"CR", "DX"}
# Exceptions pydicom and its decoders raise on truncated or corrupt files.
_READ_ERRORS = (
    InvalidDicomError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    struct.error,
)
_DECODE_ERRORS = (*_READ_ERRORS, AttributeError, NotImplementedError)


class _WithholdValues(logging.Filter):
    """pydicom's warnings quote header values, which may identify a patient: log only that one happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug(
            "pydicom reported a %s; its text is withheld because it may quote header values",
            record.levelname.lower(),
        )
        return False


logging.getLogger("pydicom").addFilter(_WithholdValues())


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's value-quoting warnings off the user's terminal (counted at DEBUG instead)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if caught:
        logger.debug("pydicom issued %d warning(s); text withheld (may quote header values)", len(caught))


def source_name(src: object) -> str:
    """What messages call an input: a path's basename only, never its folders (they may name a patient)."""
    if isinstance(src, str | os.PathLike):
        return os.path.basename(os.fspath(src).rstrip("/\\")) or "input"
    return "the image data"


def missing_path(src: str | os.PathLike[str]) -> str:
    """How a message names an input that is not there: its absolute path, so the user sees where medgem looked
    (the file does not exist, so no content can leak; errors about a file's content use `source_name`)."""
    return os.path.abspath(os.path.expanduser(os.fspath(src)))


def is_dicom(head: bytes) -> bool:
    """True when `head` (the first 132+ bytes of a file) carries the DICOM Part 10 'DICM' marker."""
    return head[128:132] == b"DICM"


def read_dicom(src: DicomSource, *, pixels: bool = True, max_inflated: int = MAX_INFLATED_BYTES) -> Dataset:
    """Read a DICOM file (Part 10, or a bare dataset without preamble) into a pydicom Dataset.

    Raises InputError for a missing, truncated or non-DICOM file. `pixels=False` skips the pixel data
    (fast header reads for sorting a series). A deflated dataset that inflates past `max_inflated`
    bytes is refused before pydicom inflates it (pydicom inflates the whole file into memory).
    """
    name = source_name(src)
    if isinstance(src, str | os.PathLike):
        check_regular_file(src)
        with open(src, "rb") as f:
            _refuse_deflate_bomb(f, name, max_inflated)
    fp: Any = io.BytesIO(src) if isinstance(src, bytes) else src
    with quiet_pydicom():
        _refuse_deflate_bomb(fp, name, max_inflated)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=not pixels)
        except InvalidDicomError:
            ds = _read_bare_dataset(fp, name, pixels)
        except _READ_ERRORS as exc:
            raise InputError(
                f"{name}: the DICOM file is truncated or corrupt ({type(exc).__name__})"
            ) from None
    if len(ds) == 0:
        raise InputError(f"{name}: the DICOM file is truncated or empty (no elements after the header)")
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(
            f"{name}: the DICOM file holds no image (modality {ds.get('Modality', '?')}), "
            "or is truncated before the image attributes"
        )
    if pixels and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(
            f"{name}: the DICOM file has image attributes but no pixel data; it is probably truncated"
        )
    return ds


class TooLargeError(InputError):
    """An input that declares (or inflates to) more than a limit allows: HTTP 413."""

    http_status = 413


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse what is not a regular file before opening it: a FIFO would block forever, a device never end."""
    name = source_name(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{missing_path(path)}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read the file ({type(exc).__name__})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{name}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{name}: not a regular file (a pipe, socket or device); refusing to read it")


def _refuse_deflate_bomb(fp: Any, name: str, limit: int) -> None:
    """For the deflated transfer syntax, count the inflated size in 1 MiB steps (nothing kept) and refuse
    past `limit`; a 1 MB upload can otherwise inflate to gigabytes inside pydicom. Leaves fp at its start."""
    if not hasattr(fp, "seek"):
        return
    start = fp.tell()
    try:
        try:
            pydicom.filereader.read_preamble(fp, False)
            meta = pydicom.filereader._read_file_meta_info(fp)
        except Exception:  # noqa: BLE001 - not Part 10, or a broken header: pydicom reports it below
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := fp.read(1 << 20):
            total += len(inflater.decompress(chunk, 1 << 22))
            while inflater.unconsumed_tail:
                total += len(inflater.decompress(inflater.unconsumed_tail, 1 << 22))
                if total > limit:
                    break
            if total > limit:
                raise TooLargeError(f"{name}: the deflated DICOM data inflates to more than "
                                    f"{limit // 2**20} MiB; refusing to decode it")
    except zlib.error:
        raise InputError(f"{name}: the deflated DICOM data is corrupt") from None
    finally:
        fp.seek(start)


def check_pixels(ds: Dataset, name: str, max_pixels: int) -> None:
    """Refuse by the header's rows x columns x frames before any pixel is decoded."""
    pixels = header_number(ds, ds.Rows, "Rows") * header_number(ds, ds.Columns, "Columns") * frame_count(ds)
    if pixels > max_pixels:
        raise TooLargeError(f"{name}: the image has {pixels / 1e6:.1f} megapixels (rows x columns x frames); "
                            f"the limit is {max_pixels / 1e6:.1f}")


def _read_bare_dataset(fp: Any, name: str, pixels: bool) -> Dataset:
    """Old exports omit the 128-byte preamble and file meta; accept them only if they parse as an image."""
    if hasattr(fp, "seek"):
        fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=not pixels)
    except _DECODE_ERRORS:
        ds = None
    if ds is None or "Rows" not in ds or "Columns" not in ds or "SamplesPerPixel" not in ds:
        raise InputError(f"{name}: not a DICOM file") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, _little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def header_number(ds: Dataset, value: Any, keyword: str) -> float:
    """A numeric header value. A malformed one is an InputError naming the attribute, never the value
    (Python's own message would quote it, and free text in the wrong field may identify someone)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        filename = getattr(ds, "filename", None)
        name = source_name(filename) if isinstance(filename, str) else "the DICOM data"
        raise InputError(f"{name}: the {keyword} header value is not a valid number") from None


def frame_count(ds: Dataset) -> int:
    return int(header_number(ds, ds.get("NumberOfFrames") or 1, "NumberOfFrames"))


def evenly_spaced(total: int, n: int) -> list[int]:
    """`n` representative indices of `total`: the centre of each of n equal bins (all when n >= total).

    Bin centres rather than the two ends, because the first and last slices of a volume are usually
    the least informative; n=1 gives the middle one.
    """
    if n < 1:
        raise InputError(f"the number of slices must be at least 1 (got {n})")
    if n >= total:
        return list(range(total))
    return [math.floor((i + 0.5) * total / n) for i in range(n)]


def frame_attr(ds: Dataset, index: int, group: str, keyword: str) -> Any:
    """`keyword` for frame `index`: per-frame, then shared functional groups (enhanced multi-frame
    objects keep rescale, window and geometry there), then the top level."""
    for groups_keyword, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_keyword)
        if groups and i < len(groups):
            items = groups[i].get(group)
            if items and keyword in items[0]:
                return items[0][keyword].value
    return ds.get(keyword)


def _first(ds: Dataset, value: Any, keyword: str) -> float:
    """Window Center/Width may hold several alternatives (VM 1-n); the first is the primary one."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return header_number(ds, value, keyword)


def decode_frame(ds: Dataset, index: int, name: str) -> np.ndarray:
    """Stored pixel values of one frame (YBR converted to RGB by pydicom)."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputError(f"{name}: transfer syntax {ts} is not supported") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise InputError(f"{name}: decoding {ts.name} pixel data needs an extra package ({needs})")
    with quiet_pydicom():
        try:
            return pixel_array(ds, index=index if frame_count(ds) > 1 else None)
        except RuntimeError as exc:  # every decoder plugin failed; their reasons name no header values
            reason = str(exc).strip().splitlines()[-1].strip()
            raise InputError(f"{name}: cannot decode the {ts.name} pixel data ({reason})") from None
        except _DECODE_ERRORS as exc:
            raise InputError(
                f"{name}: cannot decode the {ts.name} pixel data; the file is truncated or "
                f"corrupt ({type(exc).__name__})"
            ) from None


def modality_values(ds: Dataset, stored: np.ndarray, index: int = 0, dtype: type = np.float32) -> np.ndarray:
    """Stored values -> modality values (Hounsfield units for CT), float32 unless `dtype` says otherwise
    (volume recipes use float64, as pydicom's apply_rescale in the MedGemma 1.5 CT notebook does)."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(stored, ds).astype(dtype)
    slope = frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = 1.0 if slope is None else header_number(ds, slope, "RescaleSlope")
    intercept = 0.0 if intercept is None else header_number(ds, intercept, "RescaleIntercept")
    values = stored.astype(dtype)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map modality values to [0, 1] with a VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3).

    LINEAR is the classic DICOM formula, with its half-pixel offsets:
    y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1].
    """
    function = (function or "LINEAR").upper()
    x = values.astype(np.float64)
    if function == "LINEAR" and width >= 1:
        center, width = center - 0.5, width - 1.0
    if width <= 0:  # a zero-width window is a threshold
        return (x > center).astype(np.float32)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    return np.clip((x - center) / width + 0.5, 0.0, 1.0).astype(np.float32)


def _parse_window(window: Window) -> tuple[float, float] | str | None:
    """None/'auto' -> the file's own VOI; 'minmax'; a preset name; 'C/W' or (C, W) -> that window."""
    if window is None or (isinstance(window, str) and window.lower() in ("auto", "file", "")):
        return None
    if isinstance(window, tuple):
        center, width = window
    else:
        key = window.lower()
        if key == "minmax" or key in WINDOW_PRESETS:
            return key
        try:
            center, width = (float(part) for part in key.split("/"))
        except ValueError:
            center = width = math.nan
        if not (math.isfinite(center) and math.isfinite(width)):  # never quote it: it may be any text
            choices = ", ".join([*WINDOW_PRESETS, "minmax", "auto", "CENTER/WIDTH"])
            raise InputError(f"unknown window; choose one of: {choices} (finite numbers)") from None
    if width <= 0:
        raise InputError(f"window width must be positive (got {width:g})")
    return float(center), float(width)


def _to_unit(
    ds: Dataset,
    values: np.ndarray,
    index: int,
    window: Window,
    value_range: tuple[float, float] | None,
    name: str,
) -> np.ndarray:
    """Grey modality values -> display values in [0, 1] (VOI, then MONOCHROME1 inversion)."""
    chosen = _parse_window(window)
    if isinstance(chosen, str) and chosen != "minmax":
        if ds.get("Modality") != "CT":
            raise InputError(
                f"{name}: window preset {chosen!r} is in Hounsfield units and needs a CT image "
                f"(this one is {ds.get('Modality', 'unknown')}); use 'auto' or CENTER/WIDTH"
            )
        chosen = WINDOW_PRESETS[chosen]
    if chosen is None and ds.get("VOILUTSequence"):
        lut = apply_voi(np.rint(values).astype(np.int64), ds)
        unit = lut.astype(np.float32) / (2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif chosen is None and frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth") is not None:
        center = _first(ds, frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"), "WindowCenter")
        width = _first(ds, frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"), "WindowWidth")
        function = frame_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
        unit = apply_window(values, center, width, function)
    elif isinstance(chosen, tuple):
        unit = apply_window(values, *chosen)
    else:
        low, high = value_range or _data_range(ds, values)
        unit = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _colour_to_unit(ds: Dataset, stored: np.ndarray, window: Window, name: str) -> np.ndarray:
    """RGB/YBR/palette pixels -> RGB in [0, 1]; windows are defined for grey images only."""
    if _parse_window(window) is not None:
        raise InputError(
            f"{name}: windows apply to greyscale images; this one is "
            f"{ds.PhotometricInterpretation} colour (use the default window)"
        )
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        try:  # pydicom raises ValueError (and others) on a missing or malformed palette
            with quiet_pydicom():
                rgb = apply_color_lut(stored, ds)[..., :3]
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            raise InputError(f"{name}: a PALETTE COLOR image without a usable palette lookup table") from None
    else:
        rgb, bits = stored, int(ds.get("BitsStored") or ds.BitsAllocated)
    return rgb.astype(np.float32) / (2**bits - 1)


def _reorient(unit: np.ndarray, ds: Dataset) -> np.ndarray:
    """Flip CR/DX radiographs to the standard display: feet down, patient's right on the viewer's left.

    PatientOrientation gives the patient direction along the rows and down the columns; anything
    other than a frontal 'R'/'H' never flips, so laterals and unknown views are left as stored.
    """
    orientation = ds.get("PatientOrientation")
    if ds.get("Modality") not in _RADIOGRAPHS or not orientation or len(orientation) != 2:
        return unit
    rows, columns = (str(v).upper() for v in orientation)
    if columns.startswith("H"):
        unit = unit[::-1]
        logger.debug("radiograph stored head-down; flipped vertically")
    if rows.startswith("R") and columns[:1] in ("F", "H"):
        unit = unit[:, ::-1]
        logger.debug("radiograph stored mirrored; flipped horizontally")
    return np.ascontiguousarray(unit)


def _to_image(unit: np.ndarray, size: int | None) -> Image.Image:
    pixels = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):  # found by the fuzz suite
        raise InputError("the DICOM pixel data does not match its header (samples per pixel / photometric "
                         "interpretation)")
    image = Image.fromarray(pixels).convert("RGB")
    if size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def is_colour(ds: Dataset) -> bool:
    return ds.get("PhotometricInterpretation") in _COLOUR or int(ds.get("SamplesPerPixel") or 1) > 1


def _grey_values(ds: Dataset, indices: list[int], name: str) -> list[np.ndarray]:
    """Modality values (e.g. HU) of each frame asked for."""
    return [modality_values(ds, decode_frame(ds, i, name), i) for i in indices]


def _data_range(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """min..max of the real data: PixelPaddingValue marks pixels outside the scanned field (the
    -2000 circle around a CT), which would otherwise waste most of the grey levels."""
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        real = values[values != modality_values(ds, np.asarray([padding]))[0]]
        values = real if real.size else values
    return float(values.min()), float(values.max())


def _shared_range(ds: Dataset | list[Dataset], frames: list[np.ndarray]) -> tuple[float, float]:
    """One min..max over several frames (of one object or of a series), so that they stay comparable."""
    datasets = ds if isinstance(ds, list) else [ds] * len(frames)
    ranges = [_data_range(d, v) for d, v in zip(datasets, frames, strict=True)]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _render(
    ds: Dataset,
    indices: list[int],
    window: Window,
    size: int | None,
    name: str,
    values: list[np.ndarray] | None = None,
    value_range: tuple[float, float] | None = None,
) -> list[Image.Image]:
    """Frames `indices` of `ds` as images; `values` may carry already decoded grey frames."""
    if is_colour(ds):
        return [
            _to_image(_reorient(_colour_to_unit(ds, decode_frame(ds, i, name), window, name), ds), size)
            for i in indices
        ]
    values = values if values is not None else _grey_values(ds, indices, name)
    if value_range is None and len(values) > 1:
        value_range = _shared_range(ds, values)
    return [
        _to_image(_reorient(_to_unit(ds, v, i, window, value_range, name), ds), size)
        for v, i in zip(values, indices, strict=True)
    ]


def dicom_to_images(
    ds: Dataset,
    *,
    window: Window = None,
    frame: int | None = None,
    n_frames: int | None = None,
    size: int | None = None,
    name: str = "DICOM",
) -> list[Image.Image]:
    """Render frames of a read Dataset as RGB images.

    frame: one 0-based frame; n_frames: that many evenly spaced frames; neither: the middle frame
    (the middle of a cine or volume is more typical than its first frame). Single-frame files give one.
    """
    total = frame_count(ds)
    if frame is not None and n_frames is not None:
        raise InputError("give a frame or a number of frames, not both")
    if frame is not None:
        if not 0 <= frame < total:
            raise InputError(
                f"{name}: frame {frame} does not exist (the file has {total}; frames count from 0)"
            )
        indices = [frame]
    elif n_frames is not None:
        indices = evenly_spaced(total, n_frames)
    else:
        indices = [total // 2]
    images = _render(ds, indices, window, size, name)
    logger.debug(
        "rendered %d of %d frame(s): modality=%s photometric=%s %dx%d window=%s",
        len(images),
        total,
        ds.get("Modality"),
        ds.get("PhotometricInterpretation"),
        ds.Columns,
        ds.Rows,
        window or "auto",
    )
    return images


def load_dicom(
    src: DicomSource,
    *,
    window: Window = None,
    frame: int | None = None,
    n_frames: int | None = None,
    size: int | None = None,
) -> list[Image.Image]:
    """Read a DICOM file and render it (see dicom_to_images)."""
    return dicom_to_images(
        read_dicom(src), window=window, frame=frame, n_frames=n_frames, size=size, name=source_name(src)
    )


def slice_geometry(ds: Dataset, index: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient, slice normal = row x column direction cosines) of frame `index`, or None
    when the geometry is absent or malformed."""
    position = frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient")
    orientation = frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
    try:
        point, cosines = np.asarray(position, dtype=np.float64), np.asarray(orientation, dtype=np.float64)
    except (TypeError, ValueError):  # absent or malformed geometry: sort by another key
        return None
    if point.shape != (3,) or cosines.shape != (6,) or not np.isfinite([*point, *cosines]).all():
        return None
    return point, np.cross(cosines[:3], cosines[3:])


def _slice_key(ds: Dataset) -> float | None:
    """Position along the slice normal: ImagePositionPatient . (row x column direction cosines)."""
    geometry = slice_geometry(ds)
    return None if geometry is None else float(np.dot(*geometry))


def sort_slices(slices: list[Dataset]) -> tuple[list[Dataset], str]:
    """Order a series along the patient axis; returns (sorted slices, the key used).

    ImagePositionPatient projected on the slice normal is the geometry itself; InstanceNumber is only
    the scanner's numbering and is used when any slice lacks geometry; else the file order is kept.
    """
    positions = [_slice_key(ds) for ds in slices]
    numbers = [str(ds.get("InstanceNumber", "")).strip() for ds in slices]
    if all(p is not None for p in positions):
        order = sorted(range(len(slices)), key=lambda i: positions[i])
        method = "ImagePositionPatient"
    elif all(n.lstrip("-").isdigit() for n in numbers):
        order = sorted(range(len(slices)), key=lambda i: int(numbers[i]))
        method = "InstanceNumber"
    else:
        order, method = list(range(len(slices))), "file name"
    return [slices[i] for i in order], method


def read_series(folder: str | os.PathLike[str], *, progress: bool = False,
                series: str | None = None) -> tuple[list[Dataset], str]:
    """Headers (no pixels) of the image slices in `folder`, sorted; (slices, sort key used).

    Files that are not DICOM images (DICOMDIR, notes, thumbnails) are skipped. A folder that mixes
    several series is refused rather than guessed at, with the list of its series, unless `series`
    (a SeriesInstanceUID) picks one.
    """
    name = source_name(folder)
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{missing_path(folder)}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices, skipped = [], 0
    for path in tqdm(files, desc="reading DICOM headers", unit="file", disable=not progress):
        try:
            ds = read_dicom(path, pixels=False)
        except InputError:
            skipped += 1
            continue
        slices.append(ds)
    logger.debug("series folder: %d image slice(s), %d other file(s) skipped", len(slices), skipped)
    if not slices:
        raise InputError(f"{name}: the folder holds no DICOM image files")
    found: dict[str, list[Dataset]] = {}
    for ds in slices:
        found.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if series is not None:
        if series not in found:
            raise InputError(f"{name}: no series {series} in the folder; it holds {_series_list(found)}")
        slices = found[series]
    elif len(found) > 1:
        raise InputError(f"{name}: the folder mixes {len(found)} series: {_series_list(found)}; pick one with "
                         "--series UID (or put one series per folder)")
    if any(frame_count(ds) > 1 for ds in slices) and len(slices) > 1:
        raise InputError(f"{name}: the folder mixes multi-frame files; pass a multi-frame file on its own")
    return sort_slices(slices)


def _series_list(found: dict[str, list[Dataset]]) -> str:
    """'UID (CT, 120 files); ...': enough to pick one. Shown to the user who gave the folder, never logged
    (a UID can be linked back to its study)."""
    return "; ".join(f"{uid or '(no UID)'} ({group[0].get('Modality', '?')}, {len(group)} files)"
                     for uid, group in sorted(found.items()))


def load_series(
    folder: str | os.PathLike[str],
    *,
    n_slices: int = DEFAULT_SLICES,
    window: Window = None,
    size: int | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """A CT/MR series folder -> `n_slices` evenly spaced slices in patient order, as RGB images.

    Slices keep their own file window; with none, all chosen slices share one min..max range so
    their brightness stays comparable.
    """
    slices, method = read_series(folder, progress=progress)
    chosen = [slices[i] for i in evenly_spaced(len(slices), n_slices)]
    logger.debug("series: %d slice(s) sorted by %s, %d chosen", len(slices), method, len(chosen))
    full = [
        read_dicom(ds.filename)
        for ds in tqdm(chosen, desc="decoding slices", unit="slice", disable=not progress)
    ]
    if any(is_colour(ds) for ds in full):
        return [_render(ds, [0], window, size, source_name(ds.filename))[0] for ds in full]
    values = [_grey_values(ds, [0], source_name(ds.filename))[0] for ds in full]
    value_range = _shared_range(full, values)
    return [
        _render(ds, [0], window, size, source_name(ds.filename), [v], value_range)[0]
        for ds, v in zip(full, values, strict=True)
    ]
