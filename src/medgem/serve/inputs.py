"""OpenAI chat messages -> pipeline messages: image data URIs decoded, checked against the limits, rendered.

An image arrives as `{"type": "image_url", "image_url": {"url": "data:<type>;base64,...", "window": ...}}`
with type image/png, image/jpeg or application/dicom (and, for the recipes, application/zip: a DICOM
series or DICOM WSI; image/tiff: a whole-slide image); URLs are never fetched. Every check runs
before the expensive step it guards: the image count before decoding anything, the pixel count from
the header before decoding pixels. Errors name the message and part, never the content.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from medgem.errors import InputError
from medgem.inputs import dicom, volume, wsi
from medgem.inputs.deid import safe_summary
from medgem.inputs.images import load_image
from medgem.processing import recipes
from medgem.processing.recipes import RecipePrompt
from medgem.serve.errors import APIError
from medgem.serve.schemas import ChatMessage, ChatRequest, ImagePart
from medgem.serve.settings import Limits

if TYPE_CHECKING:
    from medgem.pipeline import Pipeline

DICOM_TYPE = "application/dicom"
ZIP_TYPE = "application/zip"  # a DICOM series (ct, mri recipes) or a DICOM WSI's level files (wsi)
SLIDE_TYPE = "image/tiff"  # a whole-slide image OpenSlide reads (.svs, .ndpi, pyramidal TIFF), for the wsi recipe
RASTER_TYPES = {"image/png": "image/png", "image/jpeg": "image/jpeg", "image/jpg": "image/jpeg"}
SUPPORTED = ("image/png, image/jpeg or application/dicom (application/zip: a series, with a ct or mri recipe, or a "
             "DICOM slide; image/tiff: a slide, with the wsi recipe)")


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
    if media not in (DICOM_TYPE, ZIP_TYPE, SLIDE_TYPE) and media not in RASTER_TYPES:
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
        if media == ZIP_TYPE:
            raise APIError(400, f"{where}: a zip holds a DICOM series or slide, which needs \"recipe\": \"ct\", "
                                "\"mri\" or \"wsi\"", param=where, code="invalid_image")
        if media == SLIDE_TYPE:
            raise APIError(400, f"{where}: a whole-slide image needs \"recipe\": \"wsi\"", param=where,
                           code="invalid_image")
        decoded[id(part)] = decode_image(data, media, part.image_url.window, limits, where).image
    system, out = _system_text(messages), []
    for i, msg in enumerate(messages):
        if msg.role in ("system", "developer"):
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
    return out, system


def _system_text(messages: list[ChatMessage]) -> str | None:
    """The system and developer messages' text, joined; they may not carry images."""
    system = []
    for i, msg in enumerate(messages):
        if msg.role not in ("system", "developer"):
            continue
        if not isinstance(msg.content, str) and any(isinstance(p, ImagePart) for p in msg.content):
            raise APIError(400, f"messages[{i}]: a {msg.role} message carries text only",
                           param=f"messages[{i}]", code="invalid_message")
        system.append(msg.content if isinstance(msg.content, str) else "".join(p.text for p in msg.content))
    return "\n\n".join(s.strip() for s in system) or None


def recipe_prompt(body: ChatRequest, pipe: Pipeline, limits: Limits, max_new_tokens: int) -> tuple[RecipePrompt, str | None]:
    """A recipe request -> (the recipe's messages, the system text).

    One user message: its text parts are the question (for localize: what to find; for wsi it replaces
    the notebook's instruction), its image parts the sources. ct/mri: one zip of a series, or the
    series' DICOM files (or one multi-frame file) as application/dicom parts, up to
    volume.MAX_ARCHIVE_FILES: the image limit is the recipe's, not the server's. wsi: one image/tiff
    slide, or a DICOM WSI as one zip or its level files, with `tissue` and `procedure`; the upload's
    size is bounded by the body limit. longitudinal: prior then current (DICOM dates decide); localize:
    one image. The budget (image tokens + max_tokens against max_prompt_tokens + max_tokens) is checked
    before any slice or patch decodes.
    """
    spec = recipes.recipe(str(body.recipe))
    turns = [(i, m) for i, m in enumerate(body.messages) if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0][1].role != "user" or isinstance(turns[0][1].content, str):
        raise APIError(400, f"a {spec.name} request has one user message whose content lists the text and the "
                            "image(s)", param="messages", code="invalid_message")
    _check_recipe_fields(body, spec.takes)
    index, msg = turns[0]
    parts = image_parts([msg])
    most = volume.MAX_ARCHIVE_FILES if spec.takes in ("volume", "slide") else spec.max_images
    if not parts or len(parts) > most:
        raise APIError(400, f"the {spec.name} recipe takes {'1 to ' + str(most) if most > 1 else 'one'} image "
                            f"part(s); the request has {len(parts)}", param="messages", code="too_many_images")
    where = [w.replace("messages[0]", f"messages[{index}]", 1) for w, _ in parts]
    blobs = [parse_data_url(p.image_url.url, w) for w, (_, p) in zip(where, parts, strict=True)]
    question = " ".join(p.text for p in msg.content if not isinstance(p, ImagePart)).strip() or None
    context = limits.max_prompt_tokens + max_new_tokens
    if spec.takes != "slide" and any(media == SLIDE_TYPE for media, _ in blobs):
        raise APIError(400, f"{where[0]}: an image/tiff part is a whole-slide image, for the wsi recipe",
                       param=where[0], code="invalid_image")
    if spec.takes not in ("volume", "slide") and any(media == ZIP_TYPE for media, _ in blobs):
        raise APIError(400, f"{where[0]}: a zip holds a DICOM series or slide, for the ct, mri and wsi recipes",
                       param=where[0], code="invalid_image")
    if spec.takes in ("volume", "slide"):
        return _file_recipe(body, spec, pipe, blobs, question, max_new_tokens, context), _system_text(body.messages)
    pipe.check_budget(spec.name, len(blobs), max_new_tokens, context)
    if spec.name == "longitudinal":
        if len(blobs) != 2:
            raise APIError(400, "the longitudinal recipe takes two images: the prior, then the current one",
                           param="messages", code="invalid_image")
        (a, b), order = [d for _, d in blobs], [0, 1]
        if recipes.longitudinal_order(a, b)[2]:
            order = [1, 0]
        images = [decode_image(blobs[i][1], blobs[i][0], parts[i][1].image_url.window, limits, where[i]).image
                  for i in order]
        prompt = pipe.recipe_prompt(spec.name, question, max_new_tokens=max_new_tokens, context=context,
                                    prior=images[0], current=images[1])
        if order == [1, 0]:
            prompt.notes.append("the prior image is dated after the current one, so they were swapped")
    else:
        image = decode_image(blobs[0][1], blobs[0][0], parts[0][1].image_url.window, limits, where[0]).image
        prompt = pipe.recipe_prompt(spec.name, question, max_new_tokens=max_new_tokens, context=context,
                                    source=image)
    return prompt, _system_text(body.messages)


def _check_recipe_fields(body: ChatRequest, takes: str) -> None:
    """The recipe fields that belong to other recipes are refused by name, not ignored."""
    if takes != "volume" and (body.series is not None or body.max_slices is not None):
        raise APIError(400, "series and max_slices go with the ct and mri recipes", param="series",
                       code="invalid_request")
    if takes != "slide" and (body.tissue is not None or body.procedure is not None or body.max_patches is not None):
        raise APIError(400, "tissue, procedure and max_patches go with the wsi recipe", param="tissue",
                       code="invalid_request")
    if takes == "slide" and not ((body.tissue or "").strip() and (body.procedure or "").strip()):
        raise APIError(400, "the wsi recipe needs tissue and procedure (e.g. \"tissue\": \"colon\", "
                            "\"procedure\": \"biopsy\")", param="tissue", code="invalid_request")


def _file_recipe(body: ChatRequest, spec: recipes.Recipe, pipe: Pipeline, blobs: list[tuple[str, bytes]],
                 question: str | None, max_new_tokens: int, context: int) -> RecipePrompt:
    """ct/mri/wsi: the upload written to a temporary file or folder, read there, and removed."""
    zips = [data for media, data in blobs if media == ZIP_TYPE]
    slides = [data for media, data in blobs if media == SLIDE_TYPE]
    allowed = "one application/zip part or application/dicom parts"
    if spec.takes == "slide":
        allowed = "one image/tiff slide, one application/zip part (a DICOM slide) or a DICOM slide's application/dicom parts"
    if ((zips or slides) and len(blobs) > 1) or any(media in RASTER_TYPES for media, _ in blobs):
        raise APIError(400, f"the {spec.name} recipe takes {allowed}", param="messages", code="invalid_image")
    if slides:
        with wsi.slide_file(slides[0]) as path:
            return _read_recipe(body, spec, pipe, path, question, max_new_tokens, context)
    with volume.series_folder(files=[d for _, d in blobs] if not zips else None,
                              archive=zips[0] if zips else None) as folder:
        return _read_recipe(body, spec, pipe, folder, question, max_new_tokens, context)


def _read_recipe(body: ChatRequest, spec: recipes.Recipe, pipe: Pipeline, source, question: str | None,
                 max_new_tokens: int, context: int) -> RecipePrompt:
    if spec.takes == "slide":
        return pipe.recipe_prompt(spec.name, question, max_new_tokens=max_new_tokens, context=context, source=source,
                                  tissue=body.tissue, procedure=body.procedure,
                                  max_slices=body.max_patches or spec.max_images)
    return pipe.recipe_prompt(spec.name, question, max_new_tokens=max_new_tokens, context=context, source=source,
                              series=body.series, max_slices=body.max_slices or recipes.MAX_SLICES)
