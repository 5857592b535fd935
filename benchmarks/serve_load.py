"""Serving load test: 32 concurrent streaming clients x 4 requests each against `medgem serve` on loopback.

Each configuration runs as its own `medgem serve` process (embedded Gemma 3 270M, the CLI defaults),
so the clients here never share the server's interpreter. The peer in the same run is the same
server without batching (`--max-batch 1`: requests one after another), which shows what continuous
batching buys. Every client streams /v1/chat/completions with `stream_options.include_usage`, then
starts its next request. Checked: zero 5xx, every stream ends with `data: [DONE]` after a usage
chunk (no dropped or truncated stream). Reported per configuration:
  TTFT    = request sent -> first content delta (p50, p99)
  latency = request sent -> [DONE] (p50, p99)
  aggregate tok/s = completion tokens of all requests / wall time of the whole run
Bounded: loopback only, fixed request count, a deadline per request and per run. Writes
benchmarks/results/serve_load.json; exits 1 if any check fails.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 4] [--max-tokens 32] [--batches 1,8]
                                              [--peer-clients N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
MEDGEM = [sys.executable, "-c", "import sys; from medgem.cli import main; sys.exit(main())"]
QUESTIONS = [
    "What are the common symptoms of community-acquired pneumonia?",
    "How is type 2 diabetes usually first treated?",
    "What does an elevated troponin level suggest?",
    "List three causes of acute kidney injury.",
    "What is the first-line treatment for anaphylaxis?",
    "How do you tell a viral from a bacterial sore throat?",
    "What are the warning signs of a stroke?",
    "Why is a chest X-ray taken in two views?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat completion: timings, tokens and what its stream looked like."""
    sent = time.perf_counter()
    out = {"status": None, "ttft": None, "latency": None, "tokens": 0, "done": False, "usage": False, "error": None}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            out["status"] = reply.status_code
            if reply.status_code != 200:
                out["error"] = (await reply.aread()).decode()[:200]
                return out
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                elif chunk.get("usage"):
                    out["usage"], out["tokens"] = True, chunk["usage"]["completion_tokens"]
                elif out["ttft"] is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    out["ttft"] = time.perf_counter() - sent
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    out["latency"] = time.perf_counter() - sent
    return out


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    async def client_loop(index: int, client: httpx.AsyncClient) -> list[dict]:
        results = []
        for r in range(requests):
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": index * requests + r,
                    "messages": [{"role": "user", "content": QUESTIONS[(index + r) % len(QUESTIONS)]}]}
            results.append(await one_request(client, body))
        return results

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.wait_for(
            asyncio.gather(*(client_loop(i, client) for i in range(clients))), timeout=timeout * requests)
        wall = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r["status"] == 200 and r["done"] and r["usage"] and not r["error"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    latencies = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "status_5xx": sum(1 for r in results if r["status"] is not None and r["status"] >= 500),
        "status_4xx": sum(1 for r in results if r["status"] is not None and 400 <= r["status"] < 500),
        "transport_errors": sum(1 for r in results if r["status"] is None),
        "streams_without_done": sum(1 for r in results if r["status"] == 200 and not r["done"]),
        "error_events": sum(1 for r in results if r["status"] == 200 and r["error"]),
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "aggregate_tok_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        # the server's own count of 5xx API answers (its /ready says 503 while loading, by design)
        "server_api_5xx": sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                              if line.startswith('medgem_requests_total{route="/v1/') and 'status="5' in line),
    }


def run_config(batch: int, clients: int, args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*MEDGEM, "serve", "--port", str(port), "--max-batch", str(batch),
           "--max-queue", str(max(64, clients)), "--max-tokens", str(args.max_tokens)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited during start-up (code {server.returncode})")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 600:
                raise SystemExit("the server did not become ready in 10 minutes")
            time.sleep(0.5)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        asyncio.run(load(url, model, 1, 1, 4, args.timeout))  # warm-up
        result = asyncio.run(load(url, model, clients, args.requests, args.max_tokens, args.timeout))
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"max_batch": batch, "clients": clients, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--batches", default="1,8", help="--max-batch of each configuration")
    parser.add_argument("--peer-clients", type=int, default=None,
                        help="clients for the --max-batch 1 peer (default --clients; fewer keeps a slow machine bounded: "
                        "a server without batching has the same tok/s at any concurrency)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    args = parser.parse_args()

    load_before = os.getloadavg()
    configs = [run_config(int(b), args.peer_clients or args.clients if b.strip() == "1" else args.clients, args)
               for b in args.batches.split(",")]
    checks = all(c["status_5xx"] == 0 and c["server_api_5xx"] == 0 and c["streams_without_done"] == 0
                 and c["error_events"] == 0 and c["transport_errors"] == 0 and c["completed"] == c["requests"]
                 for c in configs)
    out = {
        "benchmark": "serve_load",
        "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "model": "embedded Gemma 3 270M (medgem serve defaults: int8 weights on CPU)",
        "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "configs": configs,
        "checks_passed": checks,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for c in configs:
        print(f"max_batch={c['max_batch']:>2}, {c['clients']} clients: {c['completed']}/{c['requests']} streams ok, 5xx={c['status_5xx']}, "
              f"TTFT p50 {c['ttft_p50_s']} s p99 {c['ttft_p99_s']} s, {c['aggregate_tok_per_s']} tok/s "
              f"({c['completion_tokens']} tokens in {c['wall_s']} s)")
    print(f"wrote {RESULTS}; checks {'passed' if checks else 'FAILED'}")
    return 0 if checks else 1


if __name__ == "__main__":
    sys.exit(main())
