"""Chat messages with images -> input_ids, pixel_values and image groups, as transformers' Gemma3Processor.

The chat template writes one `<start_of_image>` per image. Each becomes
`\\n\\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\\n\\n` (N = 256 for MedGemma),
and with pan-and-scan crops: "Here is the original image {that} and here are some crops to help you
see better {that} {that}...". The newlines are tokenised together with the surrounding text (so
"user\\n" + "\\n\\n" is one token, as in transformers), while the soft tokens are spliced in as ids:
text is encoded piecewise around them, which is exact because BOI and EOI are special tokens the
tokenizer never merges across. So a tokenizer without `<image_soft_token>` (the GGUF vocabulary) works.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from medgem.config import MultimodalConfig
from medgem.errors import InputError
from medgem.inputs.images import ImageSource, composite_on_white, load_image
from medgem.nn.medgemma import image_groups
from medgem.processing.images import ImageProcessor
from medgem.processing.tokenizer import END_OF_IMAGE, START_OF_IMAGE, Tokenizer, render_chat

PAN_AND_SCAN_INTRO = "Here is the original image "
PAN_AND_SCAN_CROPS = " and here are some crops to help you see better "


@dataclass
class MultimodalInputs:
    """One prompt ready for `Gemma3Multimodal`: ids [1, T], pixels [views, 3, S, S] (None without
    images), token_type_ids [1, T] (1 at image soft tokens, as transformers names it), groups [1, T]."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    token_type_ids: torch.Tensor
    groups: torch.Tensor
    num_crops: list[int]


def image_source(part: dict[str, Any]) -> ImageSource:
    """The image of a message part: {"type": "image", "image" | "path" | "url": ...} or the OpenAI
    shape {"type": "image_url", "image_url": {"url": ...}}. URLs must be data: or file: (no fetching)."""
    if part.get("type") == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    else:
        value = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
    if value is None:
        raise InputError("an image part has no image (expected an 'image', 'path' or 'url' field)")
    if isinstance(value, str) and value.startswith("data:"):
        try:
            return base64.b64decode(value.partition(",")[2], validate=True)
        except (binascii.Error, ValueError):
            raise InputError("an image data: URL is not valid base64") from None
    if isinstance(value, str) and value.startswith("file://"):
        return value[len("file://"):]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise InputError("image URLs are not fetched; pass a file path, a data: URL or the image itself")
    return value


def message_images(messages: list[dict[str, Any]]) -> list[ImageSource]:
    """Image sources in the order the chat template meets them."""
    return [
        image_source(part)
        for msg in messages
        if isinstance(msg, dict) and isinstance(msg.get("content"), list)
        for part in msg["content"]
        if isinstance(part, dict) and part.get("type") in ("image", "image_url")
    ]


def to_rgb_image(src: ImageSource) -> Image.Image:
    """A model-ready RGB image from a PIL image, a path (PNG, JPEG, DICOM) or raw bytes."""
    return load_image(composite_on_white(src) if isinstance(src, Image.Image) else src)


class MultimodalProcessor:
    """Tokenizer + image processor + the soft-token expansion of one model."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, tokens_per_image: int = 256,
                 image_token_id: int = 262_144):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_image = tokens_per_image
        self.image_token_id = image_token_id

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, cfg: MultimodalConfig,
                  preprocessor_config: dict[str, Any] | None = None, **overrides: Any) -> MultimodalProcessor:
        """The processor of a loaded model; `overrides` (e.g. do_pan_and_scan=True) win over the file."""
        image_processor = ImageProcessor.from_preprocessor_config(
            {**(preprocessor_config or {}), **overrides}, cfg.vision.image_size
        )
        return cls(tokenizer, image_processor, cfg.mm_tokens_per_image, cfg.image_token_id)

    def _image_sequence(self, num_crops: int) -> list[str | None]:
        """The expansion of one `<start_of_image>`; None marks a run of soft tokens."""
        full: list[str | None] = [f"\n\n{START_OF_IMAGE}", None, f"{END_OF_IMAGE}\n\n"]
        if not num_crops:
            return full
        crops: list[str | None] = []
        for i in range(num_crops):
            crops += [" ", *full] if i else full
        return [PAN_AND_SCAN_INTRO, *full, PAN_AND_SCAN_CROPS, *crops]

    def __call__(self, text: str, images: Sequence[ImageSource] = ()) -> MultimodalInputs:
        """Expand and tokenise a rendered chat string whose `<start_of_image>` markers match `images`."""
        pieces = text.split(START_OF_IMAGE)
        if len(pieces) - 1 != len(images):
            raise InputError(f"the prompt has {len(pieces) - 1} image markers but {len(images)} image(s) were given")
        pixel_values, num_crops = None, []
        if images:
            pixel_values, num_crops = self.image_processor([to_rgb_image(src) for src in images])
        expanded: list[str | None] = [pieces[0]]
        for crops, piece in zip(num_crops, pieces[1:]):
            expanded += [*self._image_sequence(crops), piece]
        ids: list[int] = []
        buffer = ""
        for item in expanded:
            if item is None:
                ids += self.tokenizer.encode(buffer, add_bos=False) + [self.image_token_id] * self.tokens_per_image
                buffer = ""
            else:
                buffer += item
        ids += self.tokenizer.encode(buffer, add_bos=False)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return MultimodalInputs(
            input_ids=input_ids,
            pixel_values=pixel_values,
            token_type_ids=(input_ids == self.image_token_id).long(),
            groups=image_groups(input_ids, self.image_token_id),
            num_crops=num_crops,
        )

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> MultimodalInputs:
        """Render Gemma's chat format (system folded into the first user turn) and process its images."""
        return self(render_chat(messages, add_generation_prompt), message_images(messages))
