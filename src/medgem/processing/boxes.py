"""Anatomical localization: the padded square the model sees, and its boxes mapped back to the image.

Reproduces google-health/medgemma, notebooks/cxr_anatomy_localization_with_hugging_face.ipynb:
- `pad_image_to_square`: 8-bit RGB, zero (black) padding split as `d // 2` before and `d - d // 2`
  after the short side, "to maintain consistency with the original preprocessing in model training".
  (The notebook then multiplies the padded uint8 array by 255, which only undoes a float conversion for
  RGBA inputs and wraps the values of others; medgem pads the 8-bit image and keeps its values.)
- the answer: a JSON list of `{"box_2d": [y0, x0, y1, x1], "label": ...}` inside ```json fences,
  coordinates on 0..1000 of the padded square, often after a thinking trace (processing/thinking.py)
  and a "Final Answer:" line. The notebook parses the fenced block; this parser also takes a bare list,
  a truncated list (its complete objects) and swapped corners, and finds nothing in garbage.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from medgem.processing.thinking import split_thought

SCALE = 1000.0  # the model's coordinate range


@dataclass(frozen=True)
class Padding:
    """Where the original image sits in the padded square the model saw."""

    width: int
    height: int
    left: int
    top: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)


@dataclass(frozen=True)
class Box:
    """A box in the original image's pixels (x to the right, y down; floats, clipped to the image)."""

    label: str | None
    x0: float
    y0: float
    x1: float
    y1: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def pad_to_square(image: Image.Image) -> tuple[Image.Image, Padding]:
    """The image centred on a black square, as the notebook pads it, and where it went."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[top:top + height, left:left + width] = rgb
    return Image.fromarray(square, "RGB"), Padding(width, height, left, top)


def to_model_coords(box: Box, padding: Padding) -> list[float]:
    """[y0, x0, y1, x1] on 0..1000 of the padded square: what the model would answer for `box`."""
    s = padding.side
    return [(box.y0 + padding.top) / s * SCALE, (box.x0 + padding.left) / s * SCALE,
            (box.y1 + padding.top) / s * SCALE, (box.x1 + padding.left) / s * SCALE]


def from_model_coords(box_2d: list[float], label: str | None, padding: Padding) -> Box:
    """The model's [y0, x0, y1, x1] on 0..1000 of the padded square -> pixels of the original image."""
    s = padding.side
    y0, x0, y1, x1 = (min(max(float(v), 0.0), SCALE) / SCALE * s for v in box_2d)
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))

    def clip(v: float, high: int) -> float:
        return min(max(v, 0.0), float(high))

    return Box(label, clip(x0 - padding.left, padding.width), clip(y0 - padding.top, padding.height),
               clip(x1 - padding.left, padding.width), clip(y1 - padding.top, padding.height))


def _valid(item: Any) -> bool:
    coords = item.get("box_2d") if isinstance(item, dict) else None
    return (isinstance(coords, list) and len(coords) == 4 and all(isinstance(v, int | float) and not
            isinstance(v, bool) and math.isfinite(v) for v in coords))


def _objects(text: str) -> list[dict[str, Any]]:
    """Every `{...}` in text that decodes as JSON and carries a box_2d, left to right. Scanning objects
    rather than the list keeps the complete boxes of a list the model did not finish."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if _valid(value):
            found.append(value)
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    return found


def parse_boxes(answer: str) -> list[dict[str, Any]]:
    """The `{"box_2d": [...], "label": ...}` objects of an answer: from its last ```json block, else
    after its last "Final Answer", else anywhere; a thought trace is ignored. [] when there are none."""
    _, text = split_thought(answer)
    fence = text.rfind("```json")
    regions = []
    if fence >= 0:
        regions.append(text[fence:])
    final = text.lower().rfind("final answer")
    if final >= 0:
        regions.append(text[final:])
    regions.append(text)
    for region in regions:
        found = _objects(region)
        if found:
            return found
    return []


def answer_boxes(answer: str, padding: Padding) -> list[Box]:
    """Boxes of an answer, in the original image's pixels."""
    return [from_model_coords(item["box_2d"], None if item.get("label") is None else str(item["label"]), padding)
            for item in parse_boxes(answer)]
