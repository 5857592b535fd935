"""The bounded queue and cancellation, on a server with one batch slot and one queue place: a full
queue answers 429 with Retry-After, a stream waiting for the slot gets keep-alive comments, and a
client that goes away stops its generation (the engine's own counters show it), streaming or not."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from medgem.serve import routes
from medgem.serve.settings import Limits, ServeSettings

MODEL = "gemma-3-270m"
# Long enough (ignore_eos) that it is still running while the other requests arrive, on any CPU.
LONG = {"model": MODEL, "prompt": "A history of medicine, chapter one:", "max_tokens": 512, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def busy(serve, real_pipe):
    settings = ServeSettings(limits=Limits(max_prompt_tokens=256, max_tokens=512), max_batch=1, max_queue=1)
    with serve(real_pipe, settings) as url:
        yield url


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition, seconds=60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_queue_is_429_and_a_dropped_stream_is_cancelled(busy, monkeypatch):
    monkeypatch.setattr(routes, "KEEPALIVE_SECONDS", 0.1)
    waiting: list[str] = []

    def queued() -> None:  # a stream that waits for the slot: keep-alive comments, then its answer
        body = {**LONG, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{busy}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line:
                    waiting.append(line)

    with httpx.Client(base_url=busy, timeout=120) as first, \
            first.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
        assert stream.status_code == 200
        # Hold the line iterator until the block ends: a half-read httpx iterator that gets garbage
        # collected closes its connection, which the server rightly takes as a client that went away.
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is generating
        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(lambda: metric(busy, "medgem_engine_queue_depth") == 1)
        refused = httpx.post(f"{busy}/v1/completions", json=LONG, timeout=30)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["x-medgem-notice"]
        wait_for(lambda: len(waiting) > 0)  # the waiting stream is being kept alive
    # leaving the block dropped the stream after its first tokens: the queued request runs now
    thread.join(timeout=120)
    assert waiting[0] == ": waiting" and waiting[-1] == "data: [DONE]"
    assert json.loads(waiting[-2][len("data: "):])["usage"]["completion_tokens"] == 3
    assert metric(busy, "medgem_engine_requests_cancelled_total") == 1
    assert metric(busy, "medgem_cancelled_requests_total") == 1
    assert metric(busy, "medgem_engine_generated_tokens_total") < 512  # the dropped stream never finished


def test_a_client_that_gives_up_cancels_a_non_streaming_request(busy):
    before = metric(busy, "medgem_engine_requests_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{busy}/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=1.5))
    wait_for(lambda: metric(busy, "medgem_engine_requests_cancelled_total") == before + 1, seconds=30)
    wait_for(lambda: metric(busy, "medgem_engine_running") == 0, seconds=10)
    reply = httpx.post(f"{busy}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200
