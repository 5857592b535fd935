"""Localization (processing/boxes.py): the notebook's padding, box round trips on non-square images, and
answers as MedGemma 1.5 writes them (fenced, after a thought, truncated, garbage)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medgem.processing.boxes import (
    Box,
    answer_boxes,
    from_model_coords,
    pad_to_square,
    parse_boxes,
    to_model_coords,
)
from medgem.processing.recipes import build

THOUGHT = "<unused94>thought\nThe clavicle is in the upper right. Draft: [{\"box_2d\": [1, 2, 3, 4]}]<unused95>"
FENCED = ('The right clavicle runs along the top of the chest.\n\nFinal Answer: ```json\n'
          '[{"box_2d": [300, 80, 410, 450], "label": "right clavicle"}]\n```\nI hope this helps.')


def notebook_pad(rgb: np.ndarray) -> np.ndarray:
    """The notebook's pad_image_to_square (its np.pad calls), on an 8-bit RGB array."""
    h, w = rgb.shape[:2]
    if h < w:
        dh = w - h
        return np.pad(rgb, ((dh // 2, dh - dh // 2), (0, 0), (0, 0)))
    dw = h - w
    return np.pad(rgb, ((0, 0), (dw // 2, dw - dw // 2), (0, 0)))


@pytest.mark.parametrize("size", [(301, 200), (200, 301), (256, 256)])
def test_padding_matches_the_notebook_and_boxes_round_trip(size):
    rgb = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    square, padding = pad_to_square(Image.fromarray(rgb))
    assert np.array_equal(np.asarray(square), notebook_pad(rgb))
    known = Box("target", 37.0, 12.0, 181.0, 163.0)
    coords = [round(v) for v in to_model_coords(known, padding)]  # the model answers whole numbers
    back = from_model_coords(coords, "target", padding)
    for a, b in zip((back.x0, back.y0, back.x1, back.y1), (known.x0, known.y0, known.x1, known.y1)):
        assert abs(a - b) <= 1.0


def test_parsing_answers():
    padding = pad_to_square(Image.new("RGB", (1000, 500)))[1]  # 250 px of black above and below
    boxes = answer_boxes(THOUGHT + FENCED, padding)
    assert boxes == [Box("right clavicle", 80.0, 50.0, 450.0, 160.0)]  # the draft inside the thought is ignored
    assert answer_boxes('[{"box_2d": [100, 0, 200, 1000]}]', padding) == [Box(None, 0.0, 0.0, 1000.0, 0.0)]
    bare = 'Final Answer: [{"box_2d": [500, 100, 600, 300], "label": "heart"}, {"box_2d": [1, 2, 3, 4], "label": 7}]'
    assert [b["label"] for b in parse_boxes(bare)] == ["heart", 7]
    truncated = 'Final Answer: ```json\n[{"box_2d": [500, 100, 600, 300], "label": "a"}, {"box_2d": [700, 1'
    assert parse_boxes(truncated) == [{"box_2d": [500, 100, 600, 300], "label": "a"}]
    swapped = answer_boxes('[{"box_2d": [600, 300, 500, 100], "label": "b"}]', padding)[0]
    assert (swapped.x0, swapped.x1) == (100.0, 300.0)
    for garbage in ("", "I cannot see a clavicle.", "```json\n[not json]\n```", '[{"box_2d": [1, 2, "x", 4]}]',
                    '[{"box_2d": [1, 2, 3]}]', THOUGHT, '{"box_2d": [NaN, 1, 2, 3]}', "[" * 500):
        assert parse_boxes(garbage) == []


def test_localize_recipe_pads_the_image(tmp_path):
    Image.new("RGB", (300, 200), (90, 90, 90)).save(tmp_path / "cxr.png")
    prompt = build("localize", "right clavicle", source=str(tmp_path / "cxr.png"))
    image, text = prompt.messages[0]["content"]
    assert image["image"].size == (300, 300) and prompt.padding.top == 50 and prompt.padding.left == 0
    assert "Where is the right clavicle?" in text["text"] and '{"box_2d": [800, 3, 840, 471]' in text["text"]
