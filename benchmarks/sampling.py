"""What sampling costs next to greedy decoding, at batch 1 and 8, on the embedded 270M (issue 22).

Each setting decodes the same prompt(s) for --new-tokens tokens (ignore_eos, so every run is as long),
through the generator the CLI uses (`Pipeline.engine.run`); decode tok/s counts every row's tokens over the
decode time. The settings rotate in rounds so drift on a shared VM hits them alike, and each reports the
median of --rounds. The peer is greedy decoding in the same run; "full sort" is the previous top-p (a
sort of the whole 262,144-token vocabulary and torch.multinomial per step), patched in for comparison.

    python benchmarks/sampling.py
    python benchmarks/sampling.py --rounds 5 --new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import medgem
from medgem.engine import generate, sampling
from medgem.engine.sampling import SamplingParams

RESULTS = Path(__file__).parent / "results"
PROMPT = ("Clinical vignette: a 67-year-old man who smokes presents with fever, productive cough and right-sided "
          "pleuritic chest pain. His chest X-ray shows consolidation of the right lower lobe. The most likely "
          "diagnosis is")
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "top-k 40": dict(temperature=0.7, top_k=40),
    "top-p 0.95": dict(temperature=0.7, top_p=0.95),
    "min-p 0.05": dict(temperature=0.7, min_p=0.05),
    "top-k 40 + top-p 0.95": dict(temperature=0.7, top_k=40, top_p=0.95),
    "top-p 0.95, full sort (before)": dict(temperature=0.7, top_p=0.95),
}


def full_sort_sample_next(logits, p, seen, generator):
    """The sampler before issue 22: temperature, then top-p by sorting the whole vocabulary, then
    torch.multinomial over it."""
    logits = sampling.apply_repetition_penalty(logits.float(), seen, p.repetition_penalty)
    if p.greedy:
        return sampling.greedy_token(logits)
    logits = logits / p.temperature
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
    logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def decode_rate(pipe, ids: list[int], batch: int, name: str, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=1, **SETTINGS[name])
    original = generate.sample_next
    if "full sort" in name:
        generate.sample_next = full_sort_sample_next
    try:
        completions = pipe.engine.run([ids] * batch, [params] * batch)
    finally:
        generate.sample_next = original
    tokens = sum(c.completion_tokens for c in completions)
    return tokens / max(c.decode_seconds for c in completions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "sampling.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    pipe = medgem.load()
    ids = pipe.tokenizer.encode(PROMPT, add_bos=True)
    report = {"model": pipe.source, "quant": "int8 (default)", "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds, "batches": {}}
    for batch in map(int, args.batches.split(",")):
        decode_rate(pipe, ids, batch, "greedy", 8)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name in SETTINGS:
                runs[name].append(decode_rate(pipe, ids, batch, name, args.new_tokens))
        greedy = statistics.median(runs["greedy"])
        report["batches"][str(batch)] = {
            name: {"decode_tok_s": round(statistics.median(r), 2), "of_greedy": round(statistics.median(r) / greedy, 3),
                   "runs": [round(x, 2) for x in r]} for name, r in runs.items()}
        for name, row in report["batches"][str(batch)].items():
            print(f"batch {batch}  {name:32s} {row['decode_tok_s']:7.2f} tok/s  {row['of_greedy']:.1%} of greedy")
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
