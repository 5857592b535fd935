"""Issue 21, over real HTTP: each finding of the hostile-client probe, as the client sent it.

Bombs are refused from their headers (peak RSS measured), a lone surrogate is text, a bug is a logged
500 without a traceback that keeps the connection, the key is checked before the body is read on
every route, and errors name the field without echoing it."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file

from medgem.serve.settings import Limits, ServeSettings

MODEL = "medgemma-tiny"
SECRET = "John Q Testpatient MRN 123456"
KEY = {"Authorization": "Bearer key-one"}


def chat(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **overrides}


def image_chat(url: str) -> dict:
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "What is this?"}]}])


def openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert SECRET not in response.text and "Testpatient" not in response.text
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http(vision_server):
    with httpx.Client(base_url=vision_server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def bomb(hostile) -> bytes:
    return hostile.deflate_bomb(1000, 1000, 200)  # 193 KB on the wire, 200 MB inflated


def test_deflate_bomb_is_refused_before_inflating(http, bomb, rss):
    rss.reset()
    before = rss.peak_mb()
    error = openai_error(http.post("/v1/dicom/preview", content=bomb), 413, "image")
    assert "inflates to more than" in error["message"]
    url = f"data:application/dicom;base64,{base64.b64encode(bomb).decode()}"
    openai_error(http.post("/v1/chat/completions", json=image_chat(url)), 413, "messages[0].content[0]")
    assert rss.peak_mb() - before < 100  # pydicom alone would hold the 200 MB inflated dataset


def test_frames_count_against_the_pixel_limit(http, hostile):
    small = hostile.deflate_bomb(1000, 1000, 45)  # 45 Mpx of frames, inflates to 45 MB: under the byte bound
    error = openai_error(http.post("/v1/dicom/preview", content=small), 413, "image")
    assert "rows x columns x frames" in error["message"]


@pytest.mark.parametrize("side", [14_000, 50_000])
def test_png_over_pillows_limit_is_413(http, hostile, side, data_url):
    png = hostile.png_header(side, side)
    openai_error(http.post("/v1/dicom/preview", content=png), 413, "image")
    openai_error(http.post("/v1/chat/completions", json=image_chat(data_url(png, "image/png"))), 413,
                 "messages[0].content[0]")


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", '{"model": "medgemma-tiny", "max_tokens": 2, '
                             '"messages": [{"role": "user", "content": "Hi \\ud800 there\\u0000"}]}'),
    ("/v1/completions", '{"model": "medgemma-tiny", "max_tokens": 2, "prompt": "\\ud800"}'),
    ("/v1/completions", '{"model": "medgemma-tiny", "max_tokens": 2, "prompt": ["ok", "\\udfff\\ud800"]}'),
])
def test_lone_surrogates_are_text(http, route, body):
    response = http.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_seed_out_of_range_names_the_field(http):
    openai_error(http.post("/v1/chat/completions", json=chat(seed=2**64)), 422, "seed")
    openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "seed": -(2**63) - 1}), 422, "seed")
    assert http.post("/v1/chat/completions", json=chat(seed=2**64 - 1)).status_code == 200


def test_empty_stop_is_refused(http):
    openai_error(http.post("/v1/chat/completions", json=chat(stop=[""])), 422, "stop")
    openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": ""}), 422, "stop")


@pytest.mark.parametrize("window", [SECRET, "nan/1", "40/inf", "1/nan"])
def test_window_errors_name_the_field_never_the_value(http, window):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    error = openai_error(http.post("/v1/dicom/preview", params={"window": window}, content=ct), 400, "image")
    assert "unknown window" in error["message"]


def test_deep_json_body_is_400(http, hostile):
    body = b'{"model": "medgemma-tiny", "prompt": "x", "metadata": ' + hostile.deep_json(100_000) + b"}"
    error = openai_error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                         400)
    assert "nested deeper" in error["message"]
    assert http.get("/health").status_code == 200


def test_text_only_model_refuses_images_before_decoding(text_server, data_url):
    garbage = data_url(b"not an image at all", "image/png")  # decoding it would be a 400 'not a PNG'
    body = {**image_chat(garbage), "model": "gemma-3-270m"}
    with httpx.Client(base_url=text_server, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        error = openai_error(client.post("/v1/chat/completions", json={**body, "model": model}), 400)
    assert "no vision tower" in error["message"]


# -- the error boundary --------------------------------------------------------------------------------
def _buggy(app):
    from fastapi.responses import StreamingResponse

    @app.get("/v1/bug")
    async def bug():
        raise TypeError("a real bug, message may quote " + SECRET)

    @app.get("/v1/bug/stream")
    async def bug_stream():
        async def events():
            yield "data: {}\n\n"
            raise KeyError(SECRET)

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def buggy(serve, tiny_pipe):
    with serve(tiny_pipe, ServeSettings(model_name=MODEL), prepare=_buggy) as url:
        yield url


def test_a_bug_is_a_500_without_traceback_and_keeps_the_connection(buggy, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=buggy, timeout=30) as client:
        error = openai_error(client.get("/v1/bug"), 500)
        assert error["type"] == "server_error" and "TypeError" in error["message"]
        assert "request id" in error["message"]
        stream = client.get("/v1/bug/stream")
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
        assert SECRET not in stream.text
        assert client.get("/health").status_code == 200  # the same keep-alive connection still answers
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception in ASGI application" not in out + err
    assert "Traceback" not in caplog.text and SECRET not in caplog.text
    assert "internal error on /v1/bug: TypeError (request" in caplog.text


# -- auth first, several keys, rate limit, default max_tokens, timeout ------------------------------------
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
          ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/dicom/preview"),
          ("GET", "/metrics"), ("GET", "/openapi.json")]


@pytest.fixture(scope="module")
def keyed(serve, tiny_pipe, tmp_path_factory):
    from medgem.serve.settings import keys_from_file

    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# operators\nkey-one\n\nkey-two\n")
    limits = Limits(max_tokens=8, default_max_tokens=3)
    settings = ServeSettings(model_name=MODEL, api_keys=keys_from_file(str(key_file)), limits=limits,
                             rate_limit=0.5, rate_burst=40)
    with serve(tiny_pipe, settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("method, route", ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic key-one"])
def test_401_before_the_body_is_parsed(keyed, method, route, auth):
    headers = {"content-type": "application/json", **({"Authorization": auth} if auth else {})}
    content = b"{not json" if method == "POST" else None
    openai_error(keyed.request(method, route, content=content, headers=headers), 401)


def test_keys_from_a_file_open_every_route(keyed):
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert keyed.get("/metrics", headers=KEY).status_code == 200
    assert keyed.get("/openapi.json", headers=KEY).status_code == 200
    assert keyed.get("/health").status_code == 200 and keyed.get("/ready").status_code == 200


def test_max_tokens_default_caps_a_request_that_omits_it(keyed):
    body = {"model": MODEL, "prompt": "x", "ignore_eos": True}
    usage = keyed.post("/v1/completions", json=body, headers=KEY).json()["usage"]
    assert usage["completion_tokens"] == 3


def test_rate_limit_is_429_with_retry_after(keyed):
    two = {"Authorization": "Bearer key-two"}
    answers = [keyed.get("/v1/models", headers=two) for _ in range(45)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    openai_error(limited[0], 429)
    assert keyed.get("/health").status_code == 200  # probes are never limited


def test_public_metrics_and_openapi_when_configured(serve, tiny_pipe):
    settings = ServeSettings(model_name=MODEL, api_keys=("k",), public_paths=("/metrics", "/openapi.json"))
    with serve(tiny_pipe, settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        openai_error(client.get("/v1/models"), 401)


def test_request_timeout_is_504(serve, tiny_pipe):
    settings = ServeSettings(model_name=MODEL, request_timeout=0.3, limits=Limits(max_tokens=4000,
                                                                                  max_prompt_tokens=64))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True}
    with serve(tiny_pipe, settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        error = openai_error(client.post("/v1/completions", json=body), 504)
        assert error["code"] == "request_timeout" and time.monotonic() - started < 10
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.text.endswith("data: [DONE]\n\n") and "request_timeout" in streamed.text
        assert client.get("/health").status_code == 200
        assert json.loads(client.post("/v1/completions", json={**body, "max_tokens": 1}).text)["choices"]


def test_pixel_data_that_contradicts_its_header_is_400(http):
    """Found by benchmarks/fuzz.py: an RGB header over 8 bytes of 1 x 1 pixel data made Pillow raise TypeError (500)."""
    from medgem.serve.fuzz import dicom_bytes

    body = dicom_bytes(1, 1, 1, 8, "RGB", 8, "", None)
    error = openai_error(http.post("/v1/dicom/preview", content=body), 400, "image")
    assert "does not match its header" in error["message"]
