"""Any image input -> RGB PIL images: PNG/JPEG photos and scans, DICOM files, DICOM series folders.

`load_image` is the single entry point for one image (chat messages, the HTTP API, `--image`); it
sniffs the bytes rather than trusting a file extension, because DICOM files often have none.
`load_images_from_path` also takes a series folder or a multi-frame file and returns several.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from medgem.errors import InputError
from medgem.inputs import dicom
from medgem.inputs.dicom import DEFAULT_SLICES, Window, source_name

ImageSource = str | os.PathLike[str] | bytes | Image.Image


def composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels over a white background, as transformers' `convert_to_rgb` does; an image
    without alpha is returned unchanged (its mode is handled by the image loader)."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied (phone photos of slides), 16-bit/float scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Pillow's own conversion clips 16-bit greys at 255; stretch their range instead.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(np.rint(scaled).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_raster(data: bytes, name: str) -> Image.Image:
    """PNG/JPEG (or any raster Pillow reads) from bytes, fully decoded so truncation shows up here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a PNG, JPEG or DICOM image") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the image is too large to load safely") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: the image file is truncated or corrupt ({type(exc).__name__})") from None


def _read_bytes(src: str | os.PathLike[str], limit: int = -1) -> bytes:
    """The file's bytes (the first `limit` only, to sniff the format), or an InputError naming it."""
    name = source_name(src)
    if os.path.isdir(src):
        raise InputError(
            f"{name} is a folder; pass one image file (a series folder needs load_images_from_path)"
        )
    dicom.check_regular_file(src)
    try:
        with Path(src).open("rb") as file:
            return file.read(limit)
    except FileNotFoundError:
        raise InputError(f"{dicom.missing_path(src)}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read the file ({type(exc).__name__})") from None


def load_image(
    src: ImageSource, window: Window = None, *, frame: int | None = None, size: int | None = None
) -> Image.Image:
    """One RGB image from a path, raw bytes or a PIL image; DICOM is rendered (see medgem.inputs.dicom).

    window: DICOM only, a CT preset ('lung', 'mediastinum', 'bone', 'brain', 'abdomen'), 'C/W',
    'minmax' or None for the file's own window. frame: for multi-frame DICOM (default: the middle one).
    size: shrink so the longer side is at most this many pixels (previews); None keeps native size.
    """
    if isinstance(src, Image.Image):
        image = to_rgb(src)
    else:
        name = source_name(src)
        data = src if isinstance(src, bytes) else _read_bytes(src)
        if not data:
            raise InputError(f"{name}: the file is empty")
        if dicom.is_dicom(data) or not looks_like_raster(data):
            try:
                return dicom.load_dicom(src, window=window, frame=frame, size=size)[0]
            except InputError:
                if dicom.is_dicom(data):
                    raise
                raise InputError(f"{name}: not a PNG, JPEG or DICOM image") from None
        image = _open_raster(data, name)
    if window is not None or frame is not None:
        raise InputError("window and frame apply to DICOM images only")
    if size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def looks_like_raster(data: bytes) -> bool:
    """Whether Pillow recognises the format (header only; decoding errors are reported later)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Image.DecompressionBombError:  # a raster, and too large: _open_raster says so
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def load_images_from_path(
    path: str | os.PathLike[str],
    n_slices: int = DEFAULT_SLICES,
    *,
    window: Window = None,
    size: int | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """RGB images from a file or a folder.

    A folder is one CT/MR series: n_slices evenly spaced slices in patient order. A multi-frame DICOM
    file gives n_slices evenly spaced frames; any other file gives one image.
    """
    if os.path.isdir(path):
        return dicom.load_series(path, n_slices=n_slices, window=window, size=size, progress=progress)
    if dicom.is_dicom(_read_bytes(path, limit=132)):
        ds = dicom.read_dicom(path)
        n_frames = n_slices if dicom.frame_count(ds) > 1 else None
        return dicom.dicom_to_images(ds, window=window, n_frames=n_frames, size=size, name=source_name(path))
    return [load_image(path, window, size=size)]


def contact_sheet(images: list[Image.Image], tile: int = 256, labels: list[str] | None = None) -> Image.Image:
    """Several images on one black RGB sheet, row-major in the given order, each fitted in a tile²
    cell (scaled up or down, aspect kept): a preview of a series that opens in any viewer. `labels`
    (e.g. the recipe's 'SLICE n') are written in each cell's top-left corner, white on a black outline."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(10, tile // 14))
    for i, image in enumerate(images):
        thumb = ImageOps.contain(image, (tile, tile), Image.Resampling.LANCZOS)
        x, y = (i % columns) * tile, (i // columns) * tile
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        if labels:
            draw.text((x + 4, y + 2), labels[i], fill="white", font=font, stroke_width=2, stroke_fill="black")
    return sheet
