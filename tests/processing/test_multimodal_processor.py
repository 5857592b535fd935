"""Processor parity with transformers' Gemma3Processor (PIL image path), pan-and-scan on and off.

Both sides get the same chat string (rendered by medgem) and the same images: real pictures from
scikit-image (a fundus photograph, an IHC slide), crops of them wide and tall enough to trigger
pan-and-scan, a grey image, a transparent PNG and a JPEG given as file paths. transformers'
tokenizer is built from the same vocabulary (the embedded Gemma 3 GGUF) plus `<image_soft_token>`
as id 262144, as in multimodal Gemma 3 checkpoints.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from medgem.config import MULTIMODAL_PRESETS
from medgem.errors import ConfigError, InputError
from medgem.processing.images import ImageProcessor
from medgem.processing.multimodal import MultimodalProcessor, message_images
from medgem.processing.tokenizer import render_chat

SOFT = 262_144


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> PIL image or path string."""
    folder = tmp_path_factory.mktemp("images")
    retina = Image.fromarray(skdata.retina())  # 1411 x 1411 RGB fundus photograph
    ihc = Image.fromarray(skdata.immunohistochemistry())  # 512 x 512 RGB slide
    alpha = np.tile(np.linspace(0, 255, 500).astype(np.uint8), (300, 1))
    rgba = np.dstack([skdata.immunohistochemistry()[:300, :500], alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    retina.crop((0, 400, 1411, 900)).save(folder / "wide.jpg", quality=90)
    return {
        "retina": retina,
        "ihc": ihc,
        "wide": retina.crop((0, 300, 1411, 780)),  # ratio 2.9: three crops across
        "tall": ihc.crop((0, 0, 300, 512)).resize((300, 1000)),  # ratio 3.3: three crops down
        "grey": Image.fromarray(skdata.retina()[..., 1]),  # mode L
        "transparent_pil": Image.open(folder / "transparent.png"),
        "transparent_path": str(folder / "transparent.png"),
        "wide_jpeg_path": str(folder / "wide.jpg"),
    }


CASES = {
    "one image, system prompt": lambda im: [
        {"role": "system", "content": "You are an expert radiologist."},
        {"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                     {"type": "image", "image": im["retina"]}]},
    ],
    "two images, text around": lambda im: [
        {"role": "user", "content": [{"type": "image", "image": im["wide"]},
                                     {"type": "text", "text": "Compare with the slide:"},
                                     {"type": "image", "image": im["tall"]},
                                     {"type": "text", "text": "Findings?"}]},
    ],
    "multi-turn, images in both turns": lambda im: [
        {"role": "user", "content": [{"type": "image", "image": im["grey"]}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A fundus photograph."},
        {"role": "user", "content": [{"type": "text", "text": "And these?"},
                                     {"type": "image", "image": im["transparent_pil"]},
                                     {"type": "image", "path": im["transparent_path"]},
                                     {"type": "image", "image": im["wide_jpeg_path"]}]},
    ],
}


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_gemma3_processor(tokenizer, hf_processor, images, case, pan_and_scan):
    messages = CASES[case](images)
    ours = MultimodalProcessor.for_model(tokenizer, MULTIMODAL_PRESETS["4b"], do_pan_and_scan=pan_and_scan)
    got = ours.apply_chat_template(messages)
    hf_images = [[src if isinstance(src, Image.Image) else str(src) for src in message_images(messages)]]
    expected = hf_processor(text=render_chat(messages), images=hf_images, add_special_tokens=False,
                            return_tensors="pt", do_pan_and_scan=pan_and_scan)
    assert got.input_ids.tolist() == expected["input_ids"].tolist()
    assert got.token_type_ids.tolist() == expected["token_type_ids"].tolist()
    assert got.pixel_values.shape == expected["pixel_values"].shape
    assert (got.pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-6
    views = len(message_images(messages)) + sum(got.num_crops)
    assert int((got.input_ids == SOFT).sum()) == 256 * views
    assert got.groups.unique().numel() == views + 1  # one group per view, plus -1 for text
    if pan_and_scan and case == "two images, text around":
        assert got.num_crops == [3, 3]


def test_dicom_path_and_data_url(tokenizer):
    """A chest CR given by path and a PNG given as a data: URL go through the medical image loader."""
    from pydicom.data import get_testdata_file

    png = io.BytesIO()
    Image.fromarray(skdata.immunohistochemistry()).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image", "image": get_testdata_file("RG1_UNCR.dcm")},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe this X-ray"},
    ]}]
    processor = MultimodalProcessor.for_model(tokenizer, MULTIMODAL_PRESETS["4b"])
    got = processor.apply_chat_template(messages)
    assert got.pixel_values.shape == (2, 3, 896, 896) and got.pixel_values.dtype == torch.float32
    assert -1.0 <= got.pixel_values.min() < got.pixel_values.max() <= 1.0
    assert int((got.input_ids == SOFT).sum()) == 512
    direct = processor.image_processor([Image.open(png)])[0][0]
    assert torch.equal(got.pixel_values[1], direct)


def test_bad_inputs_are_input_errors(tokenizer, images):
    processor = MultimodalProcessor.for_model(tokenizer, MULTIMODAL_PRESETS["4b"])
    with pytest.raises(InputError, match="1 image markers but 2 image"):
        processor(render_chat([{"role": "user", "content": [{"type": "image", "image": images["ihc"]}]}]),
                  [images["ihc"], images["ihc"]])
    for part, message in [
        ({"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}, "not fetched"),
        ({"type": "image", "image": "data:image/png;base64,@@@"}, "not valid base64"),
        ({"type": "image"}, "has no image"),
        ({"type": "image", "image": b"not an image at all"}, "not a PNG, JPEG or DICOM"),
    ]:
        with pytest.raises(InputError, match=message):
            processor.apply_chat_template([{"role": "user", "content": [part]}])


def test_preprocessor_config_is_read_and_checked():
    published = {  # google/medgemma-4b-it preprocessor_config.json
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 256,
        "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896},
    }
    assert ImageProcessor.from_preprocessor_config(published, 896) == ImageProcessor()
    with pytest.raises(ConfigError, match="resizes to 448x448"):
        ImageProcessor.from_preprocessor_config({"size": {"height": 448, "width": 448}}, 896)
