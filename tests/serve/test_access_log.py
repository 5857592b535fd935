"""Server defaults and logs a user sees first (issue 22): one access line per request that never holds the
prompt, the model card says the embedded model is a base model, `--default-temperature` applies to
requests that omit temperature, and error codes are snake_case."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import httpx

from medgem.serve.settings import ServeSettings

from .conftest import TEST_LIMITS

SECRET = "Patient Zelda Quokka-Marsh"


def test_one_access_line_per_request_without_the_prompt(real_pipe, serve, caplog):
    with serve(real_pipe) as url, caplog.at_level(logging.INFO, logger="medgem.access"):
        answer = httpx.post(f"{url}/v1/completions", json={"model": "gemma-3-270m", "prompt": SECRET, "max_tokens": 3,
                                                           "temperature": 0}, timeout=60)
        streamed = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "gemma-3-270m", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 2,
            "stream": True})
        missing = httpx.get(f"{url}/v1/nope", timeout=10)
        httpx.get(f"{url}/health", timeout=10)  # probes are not logged
    assert answer.status_code == 200 and streamed.status_code == 200 and missing.status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "medgem.access"]
    usage = answer.json()["usage"]
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"POST /v1/completions 200 {usage['prompt_tokens']}\+3 tokens \d+ ms", lines[0])
    assert re.fullmatch(r"POST /v1/chat/completions 200 \d+\+2 tokens \d+ ms", lines[1])  # after the stream ended
    assert re.fullmatch(r"GET unmatched 404 \d+ ms", lines[2])
    assert not [r for r in caplog.records if "Zelda" in r.getMessage()]


def test_model_card_default_temperature_and_snake_case_codes(real_pipe, tiny_pipe, serve):
    greedy = ServeSettings(limits=TEST_LIMITS, default_temperature=0.0)
    with serve(real_pipe, greedy) as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert card["base_model"] is True
        body = {"model": card["id"], "prompt": "Asthma is", "max_tokens": 6}  # no temperature: the server's
        texts = {httpx.post(f"{url}/v1/completions", json={**body, "seed": s}, timeout=60).json()["choices"][0]["text"]
                 for s in (1, 2, 3)}
        assert texts == {real_pipe.complete(["Asthma is"], raw=True, max_new_tokens=6, temperature=0)[0].text}
        refused = httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
            "model": card["id"], "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "capability_error"
    with serve(tiny_pipe, replace(greedy, model_name="medgemma-tiny")) as url:
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["base_model"] is False
