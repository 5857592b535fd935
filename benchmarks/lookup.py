"""Prompt lookup decoding (`--draft lookup`) against plain decoding, on prompts that quote more or less.

One model (the embedded 270M, int8, 2 threads by default) in one process; three pipelines share it:
plain decoding, prompt lookup with slow start (medgem's default) and prompt lookup drafting k tokens
every step (slow_start=False, as llama.cpp and vLLM draft). Each prompt is generated greedily for
--new-tokens tokens (end of text ignored); decode tok/s as in benchmarks/decode.py, medians of --runs
runs after a warm-up, the pipelines taking turns. The prompts (synthetic, no real patient):
- discharge: benchmarks/decode.py's prompt, a discharge summary the base model tends to repeat;
- report: a radiology report followed by a request to rewrite it for the patient (quotes its input);
- free: an open-ended sentence (quotes nothing but what it has written itself).
Writes benchmarks/results/lookup.json. The peer comparison (llama.cpp's own prompt lookup) is in
benchmarks/decode.py (engines llama.cpp-lookup, medgem-int8-lookup).

    python benchmarks/lookup.py [--k 8] [--runs 3] [--quant int8] [--compile]
"""

from __future__ import annotations  # noqa: I001 (medgem is imported before torch on purpose, below)

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import medgem  # (before torch: the engine's OpenMP and huge-page defaults)
import torch
from medgem.bench import bench_prompt, timed_generation
from medgem.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
REPORT = ("Chest radiograph, two views. Findings: The cardiomediastinal silhouette is within normal limits. "
          "There is a focal opacity in the right lower lobe, consistent with pneumonia. No pleural effusion or "
          "pneumothorax. The osseous structures are intact. Impression: 1. Right lower lobe pneumonia. "
          "2. No pleural effusion.\n\nThe same report rewritten in plain language for the patient:")
FREE = "The history of medicine begins with"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8, help="most tokens drafted per step")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quant", default="int8", choices=["none", "int8", "int4"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "lookup.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = medgem.load(dtype="bfloat16" if args.quant != "none" else "float32", quant=args.quant)
    if args.compile:
        base.compile()
    encode = base.tokenizer.encode
    prompts = {"discharge": bench_prompt(lambda text: encode(text, add_bos=True), 128),
               "report": encode(REPORT, add_bos=True), "free": encode(FREE, add_bos=True)}
    pipes = {"plain": base}
    for name, slow_start in (("lookup slow start", True), (f"lookup always k={args.k}", False)):
        pipes[name] = Pipeline(base.model, base.tokenizer, base.config, name)
        pipes[name].use_prompt_lookup(args.k, slow_start=slow_start)
    runs: dict[str, dict[str, list[float]]] = {p: {n: [] for n in pipes} for p in prompts}
    accepted: dict[str, dict[str, float]] = {p: {} for p in prompts}
    for prompt, ids in prompts.items():
        timed = {name: timed_generation(pipe, ids, args.new_tokens) for name, pipe in pipes.items()}
        for once in timed.values():
            once()  # warm-up (and, with --compile, compiling)
        for _ in range(args.runs):  # the pipelines take turns, so a slower spell hits each of them
            for name, once in timed.items():
                _, decode_s, count = once()
                runs[prompt][name].append((count - 1) / decode_s)
        for name, pipe in pipes.items():
            if pipe.draft is not None:
                stats = pipe._draft_scheduler().metrics()
                accepted[prompt][name] = round(stats["draft_tokens_accepted"] / max(stats["draft_tokens_proposed"], 1), 3)
                pipe.close()  # a fresh scheduler (and counters) for the next prompt
    results = {p: {n: {"decode_tok_s": round(statistics.median(r), 1), "vs_plain": round(
        statistics.median(r) / statistics.median(runs[p]["plain"]), 2), "runs": [round(x, 1) for x in r],
        **({"accepted_share_of_drafts": accepted[p][n]} if n in accepted[p] else {})} for n, r in by.items()}
        for p, by in runs.items()}
    report = {"benchmark": "lookup", "quant": args.quant, "compiled": args.compile, "k": args.k,
              "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
              "load_avg_at_end": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
