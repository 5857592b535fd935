"""Issue 21: property-based fuzzing of a real server on loopback (medgem.serve.fuzz holds the strategies).

A bounded, derandomized run (MEDGEM_FUZZ_EXAMPLES generated requests, 320 by default, over every route,
then the fixed corpus of bombs and deep JSON): no answer >= 500, no connection closed without an answer,
every error in OpenAI's shape and echoing nothing, /health and a normal request fine afterwards, and
the process's peak RSS under its idle RSS + 1 GB. benchmarks/fuzz.py runs the same strategies longer."""

from __future__ import annotations

import os
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings

from medgem.serve.fuzz import Probe, check, strategies

FUZZ_EXAMPLES = int(os.environ.get("MEDGEM_FUZZ_EXAMPLES", "320"))


def send(client: httpx.Client, probe: Probe) -> httpx.Response:
    """One probe; a connection dropped without an answer raises (httpx.RemoteProtocolError) and fails."""
    headers = {"content-type": probe.content_type} if probe.content_type else {}
    return client.request(probe.method, probe.path, content=probe.body, params=probe.params, headers=headers)


def test_fuzzed_requests_keep_the_contract(vision_server, hostile, rss, data_url):
    client = httpx.Client(base_url=vision_server, timeout=120)
    normal = {"model": "medgemma-tiny", "prompt": "The chest X-ray shows", "max_tokens": 3, "temperature": 0}
    expected = client.post("/v1/completions", json=normal).json()["choices"][0]["text"]
    idle = rss.now_mb()
    rss.reset()
    statuses: Counter[int] = Counter()
    routes: Counter[str] = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategies())
    def probe(p: Probe) -> None:
        response = send(client, p)
        statuses[response.status_code] += 1
        routes[p.path] += 1
        problem = check(response.status_code, dict(response.headers), response.text)
        assert problem is None, f"{p.method} {p.path}: {problem}: {response.text[:300]}"

    probe()
    corpus = [
        Probe("POST", "/v1/dicom/preview", hostile.deflate_bomb(1000, 1000, 200), "application/dicom"),
        Probe("POST", "/v1/dicom/preview", hostile.png_header(50_000, 50_000), None),
        Probe("POST", "/v1/chat/completions", b'{"model": "medgemma-tiny", "messages": [{"role": "user", '
              b'"content": [{"type": "image_url", "image_url": {"url": "'
              + data_url(hostile.png_header(14_000, 14_000), "image/png").encode() + b'"}}]}]}'),
        Probe("POST", "/v1/completions", b'{"model": "medgemma-tiny", "prompt": ' + hostile.deep_json(100_000) + b"}"),
        Probe("POST", "/v1/completions", b'{"model": "medgemma-tiny", "max_tokens": 2, "prompt": "\\ud800\\u0000"}'),
        Probe("POST", "/v1/chat/completions", b'{"model": "medgemma-tiny", "seed": 18446744073709551616, '
              b'"messages": [{"role": "user", "content": "hi"}]}'),
    ]
    for p in corpus:
        response = send(client, p)
        statuses[response.status_code] += 1
        assert check(response.status_code, dict(response.headers), response.text) is None, response.text[:300]
    total = sum(statuses.values())
    print(f"fuzz: {total} requests, statuses {dict(sorted(statuses.items()))}, routes {dict(routes)}, "
          f"idle RSS {idle:.0f} MB, peak {rss.peak_mb():.0f} MB")
    assert total >= 300 and len(routes) >= 8
    assert rss.peak_mb() < idle + 1024
    assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json=normal).json()["choices"][0]["text"] == expected
    client.close()
