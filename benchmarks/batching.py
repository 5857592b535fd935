"""Continuous batching on the embedded Gemma 3 270M: throughput by stream count, and time-to-first-token
while a 2,000-token prompt arrives during decoding.

Throughput: 1, 4, 8 and 16 concurrent streams (distinct 64-token prompts, 64 new tokens each, EOS
ignored) go through one `Engine` (engine/scheduler.py), in --repeats rounds over all counts (median
run reported). Two figures per count:
  decode tok/s      = tokens produced while every stream is past its first token / that time
  end-to-end tok/s  = all new tokens / time from submitting to the last token (prefills included)
The target is decode tok/s at 8 streams >= 5x one stream.

Time-to-first-token: 4 background streams decode. A 2,000-token prompt arrives. Meanwhile 2 closed-loop
clients send short requests (32 tokens), one after another, until the long prompt has its first
token. We report p50/p99 TTFT of the short requests, the long prompt's TTFT, and the gaps between
tokens of the background streams during the long prefill. Prefill chunks of 128 and 256 tokens are
compared with a peer in the same run: the same engine prefilling the whole prompt in one forward
(prefill_chunk >= the prompt), as a static batcher does.

The machine is shared, so timings are noisy: the load average is recorded before and after each part.
Writes benchmarks/results/batching.json.

    .venv/bin/python benchmarks/batching.py [--modes bf16,int8] [--streams 1,4,8,16] [--threads 2]
    .venv/bin/python benchmarks/batching.py --threads 1   # on a loaded machine: idle OpenMP workers spin
"""

from __future__ import annotations

# isort: off
import medgem  # before torch: medgem sets libgomp's spin defaults for its engine thread (medgem/__init__.py)
# isort: on
import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Engine, Request, Scheduler

RESULTS = Path(__file__).parent / "results" / "batching.json"
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
         "int4": ("bfloat16", "int4")}
LICENCE = Path("/usr/share/common-licenses/GPL-3")  # real English text that ships on Debian machines


def corpus_ids(pipe) -> list[int]:
    """Token ids of real English text; prompts are distinct windows of it (no prefix-cache hits)."""
    text = LICENCE.read_text() if LICENCE.exists() else "The patient presented with fever and cough. " * 800
    return pipe.tokenizer.encode(text, add_bos=False)


def prompt(ids: list[int], index: int, length: int) -> list[int]:
    start = (index * 97) % (len(ids) - length)
    return [2, *ids[start:start + length - 1]]  # bos + a window


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def consume(engine: Engine, request: Request, log: list[tuple[float, int]]) -> float:
    """Run one request, logging (time, tokens) per event; returns its submit time."""
    submitted = time.perf_counter()
    async for event in engine.submit(request):
        log.append((time.perf_counter(), len(event.token_ids)))
    return submitted


async def throughput(engine: Engine, ids: list[int], streams: int, prompt_len: int, new: int) -> dict:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    logs: list[list[tuple[float, int]]] = [[] for _ in range(streams)]
    start = time.perf_counter()
    await asyncio.gather(*(consume(engine, Request(prompt(ids, 1000 + streams * 17 + i, prompt_len), params), log)
                           for i, log in enumerate(logs)))
    end = max(log[-1][0] for log in logs)
    all_started = max(log[0][0] for log in logs)
    steady = sum(n for log in logs for t, n in log if t > all_started)
    total = sum(n for log in logs for _, n in log)
    return {
        "streams": streams,
        "new_tokens": total,
        "decode_tok_s": round(steady / (end - all_started), 2) if end > all_started else None,
        "end_to_end_tok_s": round(total / (end - start), 2),
        "ttft_s_max": round(max(log[0][0] for log in logs) - start, 3),
        "wall_s": round(end - start, 2),
    }


async def ttft_under_long_prompt(engine: Engine, ids: list[int], long_len: int, pause: float, background: int,
                                 clients: int, short_len: int = 32) -> dict:
    bg_logs: list[list[tuple[float, int]]] = [[] for _ in range(background)]
    bg_params = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
    bg_tasks = [asyncio.create_task(consume(engine, Request(prompt(ids, 50 + i, 48), bg_params), log))
                for i, log in enumerate(bg_logs)]
    while not all(len(log) >= 3 for log in bg_logs):  # every background stream is decoding
        await asyncio.sleep(0.01)
    long_log: list[tuple[float, int]] = []
    long_submitted = time.perf_counter()
    long_task = asyncio.create_task(
        consume(engine, Request(prompt(ids, 7, long_len), SamplingParams(max_new_tokens=2)), long_log))
    ttfts: list[float] = []
    shorts: list[asyncio.Task] = []

    async def client(k: int) -> None:
        """Closed loop: a short request, wait for its first token, pause, again, until the long prompt's
        first token (so arrivals never outrun the engine, however loaded the machine is)."""
        i = 0
        while not long_log:
            log: list[tuple[float, int]] = []
            submitted = time.perf_counter()
            shorts.append(asyncio.create_task(consume(
                engine, Request(prompt(ids, 300 + 50 * k + i, short_len), SamplingParams(max_new_tokens=2)), log)))
            while not log:
                await asyncio.sleep(0.002)
            ttfts.append(log[0][0] - submitted)
            i += 1
            await asyncio.sleep(pause)

    await asyncio.gather(long_task, *(client(k) for k in range(clients)))
    await asyncio.gather(*shorts)
    long_first = long_log[0][0]
    gaps = [b[0] - a[0] for log in bg_logs for a, b in zip(log, log[1:])
            if long_submitted <= b[0] and a[0] <= long_first]
    for task in bg_tasks:
        task.cancel()
    await asyncio.gather(*bg_tasks, return_exceptions=True)
    return {
        "long_prompt_tokens": long_len,
        "long_prompt_ttft_s": round(long_first - long_submitted, 3),
        "short_requests": len(ttfts),
        "short_ttft_p50_s": round(statistics.median(ttfts), 3),
        "short_ttft_p99_s": round(percentile(ttfts, 99), 3),
        "background_streams": background,
        "background_p50_token_gap_s": round(statistics.median(gaps), 3) if gaps else None,
        "background_max_token_gap_s": round(max(gaps), 3) if gaps else None,
    }


def in_ended_thread(fn):
    """fn() in a thread that ends with it, as `medgem serve` loads its model and builds its engine: a
    main thread that had computed (say, allocating the engine's KV cache) would keep its own OpenMP team
    beside the engine's, and libgomp then throttles spinning and the engine decodes ~10 % slower
    (BENCHMARKS.md, prompt lookup)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(value=fn()))
    thread.start()
    thread.join()
    return box["value"]


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    dtype, quant = MODES[mode]
    pipe = in_ended_thread(partial(medgem.load, dtype=dtype, quant=quant))
    ids = corpus_ids(pipe)
    out: dict = {"dtype": dtype, "quant": quant, "throughput": []}
    options = dict(max_slots=max(args.streams), max_len=args.prompt_tokens + args.new_tokens + 8,
                   prefill_chunk=args.chunk, prefix_cache_mb=0)
    with Engine(in_ended_thread(partial(Scheduler, pipe.engine, **options))) as engine:
        asyncio.run(throughput(engine, ids, 2, 16, 4))  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in args.streams}
        for _ in range(args.repeats):  # rounds over every count, so a slow spell hits all counts alike
            for n in args.streams:
                before = loadavg()
                row = asyncio.run(throughput(engine, ids, n, args.prompt_tokens, args.new_tokens))
                row["loadavg_before"], row["loadavg_after"] = before, loadavg()
                runs[n].append(row)
                print(f"{mode}: {row}", file=sys.stderr)
        for rows in runs.values():  # the median run by decode tok/s, with every run's figure
            row = sorted(rows, key=lambda r: r["decode_tok_s"] or 0)[len(rows) // 2]
            out["throughput"].append({**row, "decode_tok_s_runs": [r["decode_tok_s"] for r in rows]})
    by = {r["streams"]: r for r in out["throughput"]}
    if 1 in by and 8 in by:
        out["decode_ratio_8_vs_1"] = round(by[8]["decode_tok_s"] / by[1]["decode_tok_s"], 2)
        out["end_to_end_ratio_8_vs_1"] = round(by[8]["end_to_end_tok_s"] / by[1]["end_to_end_tok_s"], 2)
    if mode != args.modes[0]:
        return out
    out["ttft"] = {}
    chunks = [(f"chunked_{c}", c) for c in args.ttft_chunks] + [("whole_prompt", args.long_tokens + 8)]
    for name, chunk in chunks:
        options = dict(max_slots=16, max_len=args.long_tokens + 64, prefill_chunk=chunk, prefix_cache_mb=0)
        with Engine(in_ended_thread(partial(Scheduler, pipe.engine, **options))) as engine:
            before = loadavg()
            row = asyncio.run(ttft_under_long_prompt(engine, ids, args.long_tokens, args.pause, args.background,
                                                     args.clients))
            row["prefill_chunk"] = chunk
            row["loadavg_before"], row["loadavg_after"] = before, loadavg()
        out["ttft"][name] = row
        print(f"{mode} ttft {name}: {row}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="bf16,int8", help=f"comma list of {', '.join(MODES)}; TTFT runs for the first")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per prefill forward)")
    parser.add_argument("--ttft-chunks", default="128,256", help="prefill chunks to compare in the TTFT test")
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=2, help="closed-loop clients sending short requests")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds a client waits between requests")
    parser.add_argument("--background", type=int, default=4, help="streams decoding during the TTFT test")
    parser.add_argument("--repeats", type=int, default=3, help="runs per stream count; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    args.streams = [int(s) for s in args.streams.split(",")]
    args.ttft_chunks = [int(c) for c in args.ttft_chunks.split(",")]
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "continuous batching, embedded Gemma 3 270M",
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "loadavg_start": loadavg()},
        "modes": {mode: run_mode(mode, args) for mode in args.modes},
    }
    result["machine"]["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
