"""Long fuzz run: N hostile requests (medgem.serve.fuzz's strategies, the same as tests/serve/test_fuzz.py)
against a `medgem serve` process (the embedded Gemma 3 270M, served as `medgem-tiny`'s name) on loopback.

Checked, as in the test: no answer >= 500, no connection dropped without an answer, every error in
OpenAI's shape and echoing nothing, /health and a normal request fine afterwards, and the server's peak
RSS under its idle RSS + 1 GB. The server's RSS is sampled every `--every` requests (the curve goes in
the JSON). Writes benchmarks/results/fuzz.json; exits 1 if any check fails.

    .venv/bin/python benchmarks/fuzz.py [--requests 5000] [--every 250] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings

from medgem.serve.fuzz import Probe, check, strategies

RESULTS = Path(__file__).parent / "results" / "fuzz.json"
MEDGEM = [sys.executable, "-c", "import sys; from medgem.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250, help="sample the server's RSS this often")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    port = free_port()
    # The server's stderr (one access-log line per request) goes to a file: a pipe read only at the end
    # fills after a few hundred requests and then blocks the server in write().
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed after the server stops
    server = subprocess.Popen([*MEDGEM, "serve", "--port", str(port), "--model-name", "medgemma-tiny",
                               "--max-tokens", "16", "--max-tokens-default", "4"],
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=120)
    failures: list[str] = []
    dropped: list[str] = []  # requests whose connection closed without an HTTP answer
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        proc = psutil.Process(server.pid)
        normal = {"model": "medgemma-tiny", "prompt": "The chest X-ray shows", "max_tokens": 3, "temperature": 0}
        expected = client.post("/v1/completions", json=normal).json()["choices"][0]["text"]
        idle = proc.memory_info().rss / 2**20
        curve: list[tuple[int, float]] = [(0, idle)]
        statuses: Counter[int] = Counter()
        routes: Counter[str] = Counter()
        started = time.monotonic()

        @seed(args.seed)
        @settings(max_examples=args.requests, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategies())
        def probe(p: Probe) -> None:
            headers = {"content-type": p.content_type} if p.content_type else {}
            try:
                response = client.request(p.method, p.path, content=p.body, params=p.params, headers=headers)
            except httpx.TransportError as exc:
                dropped.append(f"{p.method} {p.path}: no answer ({type(exc).__name__})")
                return
            statuses[response.status_code] += 1
            routes[p.path] += 1
            problem = check(response.status_code, dict(response.headers), response.text)
            if problem:  # a 500's message names the exception type and request id, never content
                failures.append(f"{p.method} {p.path}: {problem}: {response.text[:200]}")
            done = sum(statuses.values())
            if done % args.every == 0:
                curve.append((done, proc.memory_info().rss / 2**20))

        probe()
        seconds = time.monotonic() - started
        curve.append((sum(statuses.values()), proc.memory_info().rss / 2**20))
        peak = max(r for _, r in curve)
        with open(f"/proc/{server.pid}/status") as f:  # the true peak, between samples too
            hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        healthy = client.get("/health").status_code == 200
        same = client.post("/v1/completions", json=normal).json()["choices"][0]["text"] == expected
        if not healthy or not same:
            failures.append("unhealthy afterwards" if not healthy else "a normal request changed its answer")
        if hwm > idle + 1024:
            failures.append(f"peak RSS {hwm:.0f} MB over idle {idle:.0f} MB + 1 GB")
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.seek(0)
        err = log.read()
        log.close()
    failures += dropped
    tracebacks = err.count("Traceback")
    if tracebacks:
        failures.append(f"{tracebacks} traceback(s) on the server's stderr")
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["benchmarks/fuzz.py", *sys.argv[1:]]),
        "requests": sum(statuses.values()) + len(dropped), "seconds": round(seconds, 1),
        "statuses": dict(sorted(statuses.items())), "routes": dict(routes),
        "responses_5xx": sum(n for code, n in statuses.items() if code >= 500), "dropped_connections": len(dropped),
        "idle_rss_mb": round(idle), "peak_rss_sampled_mb": round(peak), "peak_rss_vmhwm_mb": round(hwm),
        "rss_curve_mb": [(n, round(r)) for n, r in curve], "server_tracebacks": tracebacks,
        "failures": failures[:50], "failure_count": len(failures),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_curve_mb"}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
