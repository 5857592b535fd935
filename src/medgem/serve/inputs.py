"""OpenAI chat messages -> pipeline messages: image data URIs decoded, checked against the limits, rendered.

An image arrives as `{"type": "image_url", "image_url": {"url": "data:<type>;base64,...", "window": ...}}`
with type image/png, image/jpeg or application/dicom; URLs are never fetched. Every check runs
before the expensive step it guards: the image count before decoding anything, the pixel count from
the header before decoding pixels. Errors name the message and part, never the content.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from medgem.errors import InputError
from medgem.inputs import dicom
from medgem.inputs.deid import safe_summary
from medgem.inputs.images import load_image
from medgem.serve.errors import APIError
from medgem.serve.schemas import ChatMessage, ImagePart
from medgem.serve.settings import Limits

DICOM_TYPE = "application/dicom"
RASTER_TYPES = {"image/png": "image/png", "image/jpeg": "image/jpeg", "image/jpg": "image/jpeg"}
SUPPORTED = "image/png, image/jpeg or application/dicom"


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, native resolution (DICOM rendered through its display pipeline)
    media_type: str
    summary: dict[str, Any] | None  # de-identified technical header summary, DICOM only


def parse_data_url(url: str, where: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 data: URI."""
    if url.startswith(("http://", "https://", "file:")):
        raise APIError(400, f"{where}: image URLs are not fetched; send the image inline as a data: URI "
                            f"({SUPPORTED})", param=where, code="invalid_image_url")
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma:
        raise APIError(400, f"{where}: image_url.url must be a data: URI ({SUPPORTED})", param=where,
                       code="invalid_image_url")
    media, *options = header[len("data:"):].split(";")
    media = media.strip().lower()
    if media != DICOM_TYPE and media not in RASTER_TYPES:
        raise APIError(400, f"{where}: unsupported image type; send {SUPPORTED}", param=where,
                       code="unsupported_image_type")
    if "base64" not in options:
        raise APIError(400, f"{where}: the data: URI must be base64 encoded (';base64,')", param=where,
                       code="invalid_image_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the image data is not valid base64", param=where,
                       code="invalid_base64") from None
    if not data:
        raise APIError(400, f"{where}: the image data is empty", param=where, code="invalid_image")
    return media, data


def _too_many_pixels(where: str, pixels: float, limits: Limits) -> APIError:
    return APIError(413, f"{where}: the image has {pixels / 1e6:.1f} megapixels; this server accepts at most "
                         f"{limits.max_image_pixels / 1e6:.1f}", param=where, code="image_too_large")


def decode_image(data: bytes, media_type: str | None, window: str | None, limits: Limits, where: str,
                 size: int | None = None) -> DecodedImage:
    """Check and render one image. media_type None sniffs (the preview endpoint); a declared type must match."""
    is_dicom = media_type == DICOM_TYPE or (media_type is None and dicom.is_dicom(data))
    try:
        if is_dicom:
            ds = dicom.read_dicom(data, max_inflated=limits.max_image_pixels * 2 + 16 * 2**20)
            dicom.check_pixels(ds, "the DICOM data", limits.max_image_pixels)
            image = dicom.dicom_to_images(ds, window=window, size=size, name="the DICOM data")[0]
            return DecodedImage(image, DICOM_TYPE, safe_summary(ds))
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height, kind = *probe.size, (probe.format or "").lower()
        except Image.DecompressionBombError:  # over Pillow's own limit (create_app sets it from ours)
            raise APIError(413, f"{where}: the image declares more pixels than this server accepts "
                                f"({limits.max_image_pixels / 1e6:.1f} megapixels)", param=where,
                           code="image_too_large") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            expected = "a PNG or JPEG image" if media_type else "a PNG, JPEG or DICOM image"
            raise InputError(f"the data is not {expected}") from None
        if width * height > limits.max_image_pixels:
            raise _too_many_pixels(where, width * height, limits)
        image = load_image(data, window, size=size)
        return DecodedImage(image, f"image/{kind}" if kind in ("png", "jpeg") else "image/png", None)
    except InputError as exc:
        too_large = exc.http_status == 413
        raise APIError(exc.http_status, f"{where}: {exc}", param=where,
                       code="image_too_large" if too_large else "invalid_image") from None


def image_parts(messages: list[ChatMessage]) -> list[tuple[str, ImagePart]]:
    return [
        (f"messages[{i}].content[{j}]", part)
        for i, msg in enumerate(messages)
        if isinstance(msg.content, list)
        for j, part in enumerate(msg.content)
        if isinstance(part, ImagePart)
    ]


def chat_messages(messages: list[ChatMessage], limits: Limits) -> tuple[list[dict[str, Any]], str | None]:
    """Pipeline messages (images decoded to PIL) and the system text (system/developer messages joined)."""
    images = image_parts(messages)
    if len(images) > limits.max_images:
        raise APIError(400, f"the request has {len(images)} images; this server accepts at most "
                            f"{limits.max_images} per request", param="messages", code="too_many_images")
    decoded = {}
    for where, part in images:
        media, data = parse_data_url(part.image_url.url, where)
        decoded[id(part)] = decode_image(data, media, part.image_url.window, limits, where).image
    system, out = [], []
    for i, msg in enumerate(messages):
        if msg.role in ("system", "developer"):
            if not isinstance(msg.content, str) and any(isinstance(p, ImagePart) for p in msg.content):
                raise APIError(400, f"messages[{i}]: a {msg.role} message carries text only",
                               param=f"messages[{i}]", code="invalid_message")
            system.append(msg.content if isinstance(msg.content, str) else "".join(p.text for p in msg.content))
            continue
        content: Any = msg.content
        if content is None and not (msg.role == "assistant" and msg.tool_calls):
            raise APIError(400, f"messages[{i}]: content is missing", param=f"messages[{i}]", code="invalid_message")
        if isinstance(content, list):
            content = [{"type": "text", "text": p.text} if not isinstance(p, ImagePart)
                       else {"type": "image", "image": decoded[id(p)]} for p in content]
        entry: dict[str, Any] = {"role": msg.role, "content": content}
        if msg.tool_calls:  # tool traffic: processing/tools.py renders it
            entry["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
        if msg.role == "tool":
            entry["tool_call_id"] = msg.tool_call_id
        out.append(entry)
    if not out:
        raise APIError(400, "messages holds no user message", param="messages", code="invalid_message")
    return out, "\n\n".join(s.strip() for s in system) or None
