"""Bad input over real HTTP: every case gets its 4xx with an OpenAI-shaped error that names the
problem (never echoing the content), every response carries the notice, and the server stays
healthy: it answers a normal request afterwards and its metrics count no 5xx."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgem.serve.settings import Limits, ServeSettings

MODEL = "medgemma-tiny"
SECRET = "PATIENT-SMITH-1234"  # planted in bad fields: it must never come back in an error


def chat(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **overrides}


def image_message(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def png(size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 30, 30)).save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expect(response: httpx.Response, status: int, pattern: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["x-medgem-notice"].startswith("medgem is not a medical device")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(pattern, error["message"]), error["message"]
    assert SECRET not in response.text
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def http(vision_server):
    with httpx.Client(base_url=vision_server, timeout=60) as client:
        yield client


def test_malformed_json_and_non_objects(http):
    expect(http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={
        "content-type": "application/json"}), 400, "not valid JSON")
    expect(http.post("/v1/chat/completions", json=[1, 2]), 400, "must be a JSON object")
    expect(http.post("/v1/chat/completions", content=b"hello"), 400, "JSON")


WRONG_TYPES = [
    ({"model": 5}, "model"),
    ({"messages": SECRET}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "doctor", "content": SECRET}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": SECRET}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": SECRET}]}]}, "messages.0.content"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"temperature": SECRET}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": 1.5}, "seed"),
    ({"stop": 7}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": "2"}, "n"),
    ({"n": 0}, "n"),
    ({"stream": SECRET}, "stream"),
    ({"reasoning": SECRET}, "reasoning"),
]


@pytest.mark.parametrize(("fields", "param"), WRONG_TYPES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(WRONG_TYPES)])
def test_wrong_type_for_each_field_is_422(http, fields, param):
    error = expect(http.post("/v1/chat/completions", json=chat(**fields)), 422, re.escape(param))
    assert error["param"].startswith(param)


def test_completions_and_embeddings_validate_too(http):
    expect(http.post("/v1/completions", json={"model": MODEL, "prompt": 12}), 422, "prompt", "prompt")
    expect(http.post("/v1/completions", json={"model": MODEL}), 422, "prompt", "prompt")
    expect(http.post("/v1/embeddings", json={"model": MODEL, "input": "x"}), 400, "no embedding tower", "model")


def test_refusals_by_the_server(http):
    expect(http.post("/v1/chat/completions", json=chat(model="gpt-4o")), 404, "model not found", "model")
    expect(http.post("/v1/chat/completions", json=chat(max_tokens=100_000)), 400, "at most 64", "max_tokens")
    expect(http.post("/v1/chat/completions", json=chat(n=50)), 400, "at most 4 choices", "n")
    expect(http.post("/v1/chat/completions", json=chat(functions=[{"name": "f"}])), 400, "functions is not supported")
    expect(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "best_of": 2}), 400,
           "best_of is not supported")
    expect(http.get("/v1/nothing-here"), 404, "no such endpoint")
    expect(http.get("/v1/chat/completions"), 405, "method not allowed")


def test_bad_images(http, chest_dicom):
    bad = {
        "invalid base64": (f"data:image/png;base64,{SECRET}!!", 400, "not valid base64"),
        "truncated png": (f"data:image/png;base64,{b64(png()[:60])}", 400, "truncated or corrupt"),
        "non-DICOM as DICOM": (f"data:application/dicom;base64,{b64(png())}", 400, "not a DICOM file"),
        "text as DICOM": (f"data:application/dicom;base64,{b64(SECRET.encode() * 40)}", 400, "not a DICOM file"),
        "DICOM as PNG": (f"data:image/png;base64,{b64(Path(chest_dicom).read_bytes()[:4000])}", 400,
                         "not a PNG or JPEG"),
        "truncated DICOM": (f"data:application/dicom;base64,{b64(Path(chest_dicom).read_bytes()[:3000])}", 400,
                            "truncated"),
        "gif": (f"data:image/gif;base64,{b64(b'GIF89a')}", 400, "unsupported image type"),
        "not base64 encoded": ("data:image/png,rawbytes", 400, "base64"),
        "web URL": ("https://example.org/xray.png", 400, "not fetched"),
        "empty": ("data:image/png;base64,", 400, "empty"),
    }
    for name, (url, status, pattern) in bad.items():
        error = expect(http.post("/v1/chat/completions", json=chat(messages=image_message(url))), status, pattern)
        assert error["param"] == "messages[0].content[0]", name


def test_too_many_images(http):
    url = f"data:image/png;base64,{b64(png())}"
    expect(http.post("/v1/chat/completions", json=chat(messages=image_message(*[url] * 4))), 400,
           "4 images; this server accepts at most 3", "messages")
    ok = http.post("/v1/chat/completions", json=chat(messages=image_message(*[url] * 3)))
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 3 * 4


def test_prompt_over_the_models_context(http):
    long = " ".join(["pneumothorax"] * 400)  # the tiny model's context is 256 tokens
    expect(http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": long}])), 400,
           r"tokens; this server accepts at most 255 prompt tokens \(the model's context is 256\)", "messages")
    expect(http.post("/v1/completions", json={"model": MODEL, "prompt": ["ok", long], "max_tokens": 1}), 400,
           "at most 255", "prompt[1]")


@pytest.fixture(scope="module")
def strict(serve, tiny_pipe):
    """Keys on, and small body, pixel and prompt limits."""
    limits = Limits(max_body_bytes=64 * 1024, max_image_pixels=100_000, max_prompt_tokens=32, max_tokens=8,
                    default_max_tokens=4)
    settings = ServeSettings(model_name=MODEL, api_keys=("key-one", "key-two"), limits=limits)
    with serve(tiny_pipe, settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_missing_or_wrong_key_is_401(strict):
    expect(strict.post("/v1/chat/completions", json=chat()), 401, "missing API key")
    expect(strict.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid API key")
    expect(strict.get("/v1/models", headers={"Authorization": "Basic key-one"}), 401, "missing API key")
    assert strict.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert strict.get("/health").status_code == 200  # probes need no key
    assert strict.get("/").status_code == 200  # the page loads; its API calls carry the key


KEY = {"Authorization": "Bearer key-one"}


def test_body_too_large_is_413(strict):
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    expect(strict.post("/v1/chat/completions", json=big, headers=KEY), 413, "over this server's limit")

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"model": "medgemma-tiny", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    expect(strict.post("/v1/chat/completions", content=chunked(), headers={**KEY, "content-type": "application/json"}),
           413, "over this server's limit")


def test_too_many_pixels_is_413(strict):
    url = f"data:image/png;base64,{b64(png((400, 300)))}"  # 0.12 MP against a 0.1 MP limit
    expect(strict.post("/v1/chat/completions", json=chat(messages=image_message(url)), headers=KEY), 413,
           "0.1 megapixels; this server accepts at most 0.1", "messages[0].content[0]")
    dicom = get_testdata_file("CT_small.dcm")  # 128 x 128 fits
    ok = strict.post("/v1/dicom/preview", content=Path(dicom).read_bytes(), headers=KEY)
    assert ok.status_code == 200


def test_prompt_over_the_servers_limit(strict):
    expect(strict.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "word " * 40}]),
                       headers=KEY), 400, "at most 32 prompt tokens", "messages")
    expect(strict.post("/v1/chat/completions", json=chat(max_tokens=9), headers=KEY), 400, "at most 8", "max_tokens")


def test_server_is_healthy_afterwards(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    reply = http.post("/v1/chat/completions", json=chat(max_tokens=3, temperature=0))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    metrics = http.get("/metrics").text
    assert not re.search(r'medgem_requests_total\{[^}]*status="5\d\d"', metrics), metrics
    assert re.search(r'medgem_requests_total\{route="/v1/chat/completions",status="422"\} [1-9]', metrics)
    for name in ("medgem_prompt_tokens_total", "medgem_completion_tokens_total", "medgem_engine_queue_depth",
                 "medgem_request_latency_seconds_bucket", "medgem_time_to_first_token_seconds_bucket",
                 "medgem_in_flight_requests", "medgem_engine_free_slots"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", metrics, re.MULTILINE), name


def test_every_response_carries_the_notice_and_cors_is_off(http):
    for path in ("/", "/static/app.js", "/health", "/ready", "/metrics", "/v1/models", "/nowhere"):
        assert http.get(path).headers["x-medgem-notice"].startswith("medgem is not a medical device"), path
    page = http.get("/")
    assert "not a medical device" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    origin = {"Origin": "https://elsewhere.example"}
    assert "access-control-allow-origin" not in http.get("/v1/models", headers=origin).headers
    preflight = http.options("/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_for_named_origins_only(serve, tiny_pipe):
    settings = ServeSettings(model_name=MODEL, cors_origins=("https://viewer.example",))
    with serve(tiny_pipe, settings) as url:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "https://viewer.example", **ask})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
        other = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "https://evil.example", **ask})
        assert "access-control-allow-origin" not in other.headers
