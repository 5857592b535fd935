"""MedGemma 1.5's recipes over real HTTP: a CT series as a zip or as DICOM data URIs (past the server's
image limit of 3), localize's boxes in the response, and the refusals, each a 400 naming the problem."""

from __future__ import annotations

import base64
import io
import zipfile

import httpx
import pytest
from PIL import Image

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
    ({}, "zip", "needs \"recipe\": \"ct\" or \"mri\""),
    ({"recipe": "localize"}, "zip", "for the ct and mri recipes"),
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
