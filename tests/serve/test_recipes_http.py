"""MedGemma 1.5's recipes over real HTTP: a CT series as a zip or as DICOM data URIs (past the server's
image limit of 3), localize's boxes in the response, and the refusals, each a 400 naming the problem."""

from __future__ import annotations

import base64
import io
import zipfile
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from medgem.serve.settings import ServeSettings

from .conftest import TEST_LIMITS

MODEL = "medgemma-tiny"


def url(media: str, data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{base64.b64encode(data).decode()}"}}


def ask(server: str, parts: list[dict], **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Findings?"}]}],
            "max_tokens": 2, "temperature": 0, **fields}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def slices(tmp_path_factory, series_writer) -> list[bytes]:
    folder = tmp_path_factory.mktemp("ct5")
    return [p.read_bytes() for p in series_writer(folder, 5).values()]


def test_ct_series_as_zip_or_files(vision_server, tiny_pipe, slices, tmp_path):
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as zf:
        for i, blob in enumerate(slices):
            zf.writestr(f"s{i}.dcm", blob)
    for f, blob in enumerate(slices):
        (tmp_path / f"f{f}").write_bytes(blob)
    local = tiny_pipe.recipe_prompt("ct", "Findings?", source=tmp_path, max_new_tokens=2)
    expected = len(tiny_pipe.prompt_inputs(local.messages)[0])
    for parts in ([url("application/zip", packed.getvalue())], [url("application/dicom", b) for b in slices]):
        reply = ask(vision_server, parts, recipe="ct")
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == expected  # 5 slices, past the limit of 3 images


def test_localize_returns_boxes(serve, tiny_long):
    import medgem
    from medgem.serve.settings import ServeSettings

    out = io.BytesIO()
    Image.new("RGB", (40, 24), (90, 90, 90)).save(out, "PNG")
    with serve(medgem.load(tiny_long, dtype="float32"), ServeSettings(model_name=MODEL)) as server:
        reply = ask(server, [url("image/png", out.getvalue())], recipe="localize")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["boxes"] == []  # a random model writes none
        streamed = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "recipe": "localize", "stream": True, "max_tokens": 2, "messages": [{"role": "user",
            "content": [url("image/png", out.getvalue()), {"type": "text", "text": "heart"}]}]}).text
        assert '"boxes": []' in streamed or '"boxes":[]' in streamed


@pytest.mark.parametrize("fields, parts, needle", [
    ({}, "zip", 'needs "recipe": "ct", "mri" or "wsi"'),
    ({"recipe": "localize"}, "zip", "for the ct, mri and wsi recipes"),
    ({"recipe": "ct"}, "slices", "more than the"),
    ({"recipe": "mri"}, "slices", "needs a MR volume"),
    ({"recipe": "ct", "series": "1.2.3"}, "slices", "no series 1.2.3"),
    ({"recipe": "longitudinal"}, "one", "takes two images"),
    ({"recipe": "ct"}, "broken zip", "not a readable zip"),
])
def test_recipe_refusals(vision_server, slices, fields, parts, needle):
    many = slices * 20  # 100 slices: 85 chosen, more than the tiny model's 256-token context
    chosen = {"zip": [url("application/zip", b"PK")], "slices": [url("application/dicom", b) for b in many],
              "one": [url("application/dicom", slices[0])],
              "broken zip": [url("application/zip", b"PK\3\4 not really")]}[parts]
    if fields.get("recipe") in ("mri",) or "series" in fields:
        chosen = chosen[:5]
    reply = ask(vision_server, chosen, **fields)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"]["message"]


PATCH = 896


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory, slide_writer):
    """10x at level 0, 2 x 2 patches of which the top-left is stained."""
    path = tmp_path_factory.mktemp("slide") / "slide.tiff"
    slide_writer.tiff(path, mpp=1.0, side=2 * PATCH)
    return path


def test_wsi_slide_upload_as_tiff_or_dicom(vision_server, tiny_pipe, small_slide, slide_writer, tmp_path):
    local = tiny_pipe.recipe_prompt("wsi", "Findings?", source=small_slide, tissue="colon", procedure="biopsy",
                                    max_new_tokens=2)
    expected = len(tiny_pipe.prompt_inputs(local.messages)[0])
    assert local.images == 1
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as zf:
        for f in slide_writer.dicom(small_slide, tmp_path / "dicom"):
            zf.write(f, f.name)
    for part in (url("image/tiff", small_slide.read_bytes()), url("application/zip", packed.getvalue())):
        reply = ask(vision_server, [part], recipe="wsi", tissue="colon", procedure="biopsy")
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == expected  # the same patch, the same prompt


def test_wsi_refusals(vision_server, serve, tiny_pipe, small_slide, slide_writer, tmp_path):
    slide_writer.tiff(tmp_path / "blank.tiff", tissue=False, mpp=1.0, side=PATCH)
    tiff = url("image/tiff", small_slide.read_bytes())
    for fields, parts, needle in [
        ({"recipe": "wsi", "tissue": "colon"}, [tiff], "needs tissue and procedure"),
        ({}, [tiff], 'needs "recipe": "wsi"'),
        ({"recipe": "ct"}, [tiff], "for the wsi recipe"),
        ({"recipe": "ct", "tissue": "colon"}, [tiff], "go with the wsi recipe"),
        ({"recipe": "wsi", "tissue": "colon", "procedure": "biopsy", "series": "1.2"}, [tiff], "go with the ct and mri"),
        ({"recipe": "wsi", "tissue": "colon", "procedure": "biopsy"},
         [url("image/tiff", (tmp_path / "blank.tiff").read_bytes())], "no tissue found"),
        ({"recipe": "wsi", "tissue": "colon", "procedure": "biopsy"}, [url("image/tiff", b"II*\0junk")],
         "not a whole-slide image"),
    ]:
        reply = ask(vision_server, parts, **fields)
        assert reply.status_code == 400, reply.text
        assert needle in reply.json()["error"]["message"]
    small = ServeSettings(model_name=MODEL, limits=replace(TEST_LIMITS, max_body_bytes=2**20))
    with serve(tiny_pipe, small) as server:  # a slide past the body limit: refused before it is read
        reply = ask(server, [tiff], recipe="wsi", tissue="colon", procedure="biopsy")
        assert reply.status_code == 413 and "limit of 1 MiB" in reply.json()["error"]["message"]
