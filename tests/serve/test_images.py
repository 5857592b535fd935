"""Images and DICOM through the API: data URIs with the `openai` client against a random multimodal
checkpoint, compared with the pipeline called directly on the same rendered image; the preview
endpoint on a real chest radiograph, which must not leak a header identifier."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import openai
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from skimage import data as skdata

from medgem.inputs.images import load_image

MODEL = "medgemma-tiny"


@pytest.fixture(scope="module")
def client(vision_server):
    return openai.OpenAI(base_url=f"{vision_server}/v1", api_key="unused", max_retries=0, timeout=120)


def png_bytes(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def ask(image_url: dict) -> list[dict]:
    return [{"role": "system", "content": "You are an expert radiologist."},
            {"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                         {"type": "text", "text": "Describe this image."}]}]


def direct(pipe, image, max_new_tokens=5):
    """What the pipeline answers for the same question about an already-rendered image."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]
    return pipe.complete([messages], system="You are an expert radiologist.", max_new_tokens=max_new_tokens)[0]


@pytest.mark.parametrize("kind", ["png", "dicom", "ct-lung-window"])
def test_image_data_uris_reach_the_model(client, tiny_pipe, data_url, chest_dicom, kind):
    if kind == "png":
        raw = png_bytes(skdata.retina())
        url, image = data_url(raw, "image/png"), load_image(raw)
        part = {"url": url}
    elif kind == "dicom":
        url, image = data_url(chest_dicom, "application/dicom"), load_image(chest_dicom)
        part = {"url": url}
    else:
        ct = get_testdata_file("CT_small.dcm")
        part = {"url": data_url(ct, "application/dicom"), "window": "lung"}
        image = load_image(ct, window="lung")
    expected = direct(tiny_pipe, image)
    reply = client.chat.completions.create(model=MODEL, messages=ask(part), max_tokens=5, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    text_only = len(tiny_pipe.prompt_ids([{"role": "user", "content": "Describe this image."}],
                                         system="You are an expert radiologist."))
    assert reply.usage.prompt_tokens > text_only + 4  # the image's soft tokens and markers are in the prompt
    assert reply.usage.completion_tokens == expected.completion_tokens


def test_the_window_changes_what_the_model_sees(client, data_url, chest_dicom):
    ct = data_url(get_testdata_file("CT_small.dcm"), "application/dicom")
    answers = {w: client.chat.completions.create(model=MODEL, messages=ask({"url": ct, "window": w}),
                                                 max_tokens=4, temperature=0).choices[0].message.content
               for w in ("lung", "bone")}
    assert answers["lung"] != answers["bone"]
    with pytest.raises(openai.BadRequestError, match="needs a CT image"):
        client.chat.completions.create(model=MODEL, messages=ask({"url": data_url(chest_dicom, "application/dicom"),
                                                                  "window": "lung"}), max_tokens=2)


def test_dicom_preview_is_rendered_and_deidentified(vision_server, chest_dicom):
    raw = Path(chest_dicom).read_bytes()
    reply = httpx.post(f"{vision_server}/v1/dicom/preview", content=raw, params={"size": 256}, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-medgem-notice"]
    body = reply.json()
    assert body["media_type"] == "application/dicom"
    assert body["summary"]["modality"] == "CR" and body["summary"]["patient_identity_removed"] == "YES"
    png = base64.b64decode(body["image"].split(",", 1)[1])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and max(image.size) == 256 == max(body["width"], body["height"])
    header = pydicom.dcmread(chest_dicom, stop_before_pixels=True)
    text = json.dumps(body)
    for identifier in (str(header.PatientName), header.PatientID, header.PatientBirthDate, header.InstitutionName):
        assert identifier not in text
    photo = httpx.post(f"{vision_server}/v1/dicom/preview", content=png_bytes(skdata.retina()), timeout=60).json()
    assert photo["media_type"] == "image/png" and photo["summary"] is None


def test_a_text_only_model_refuses_images_with_400(text_server, data_url, chest_dicom):
    client = openai.OpenAI(base_url=f"{text_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no vision tower"):
        client.chat.completions.create(model="gemma-3-270m", max_tokens=2,
                                       messages=ask({"url": data_url(chest_dicom, "application/dicom")}))
