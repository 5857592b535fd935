"""Decode benchmark: medgem vs transformers vs llama.cpp on the same Gemma 3 270M GGUF, in one run.

Each engine runs in its own subprocess so its peak RSS is its own. All engines get the same 128-token
prompt (token ids) and generate 128 tokens greedily with --threads threads (2 by default). Times are measured the same way
for every engine:
  prefill tok/s = prompt tokens / time to the first generated token
  decode tok/s  = (new tokens - 1) / (time of the rest)
Median of --runs runs after one warm-up (of every run of every round with --rounds). Writes
benchmarks/results/decode.json.

    python benchmarks/decode.py                      # every engine that is installed
    python benchmarks/decode.py --engines medgem-int8,llama.cpp --runs 5
    python benchmarks/decode.py --engines llama.cpp,medgem-int8-compiled --rounds 3   # engines take turns
    medgem-int8-compiled runs Pipeline.compile() (torch.compile); its first run, spent compiling, is
    reported apart (first_run_with_compiling_s) and not in the medians.

Prompt lookup decoding (speculative, no draft model) is a separate comparison, not plain decoding:
medgem-int8-lookup (`--draft lookup`) against llama.cpp-lookup (llama-cpp-python's
LlamaPromptLookupDecoding), both drafting up to LOOKUP_TOKENS tokens from n-grams of up to
LOOKUP_NGRAM tokens. Its speed depends on how much the answer repeats the prompt; on this prompt (a
discharge summary that the base model tends to continue by repeating it) it is high.

    python benchmarks/decode.py --engines llama.cpp-lookup,medgem-int8-lookup --out benchmarks/results/decode_lookup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROFILE = os.environ.get("MEDGEM_BENCH_PROFILE") == "1"
THREADS = int(os.environ.get("MEDGEM_BENCH_THREADS", "2"))
ENGINES = ["medgem-fp32", "medgem-bf16", "medgem-int8", "medgem-int4", "medgem-int8-compiled", "medgem-int4-compiled",
           "transformers",
           "llama.cpp"]
LOOKUP_TOKENS, LOOKUP_NGRAM = 8, 3


def prompt_ids(n: int) -> list[int]:
    """Computed once in the parent and handed to the workers, so no worker's peak RSS includes it."""
    from medgem.bench import bench_prompt
    from medgem.processing.tokenizer import Tokenizer
    from medgem.weights import embedded_gguf, gguf_reader, medgem_home

    index = gguf_reader.GGUFIndex.load(embedded_gguf(), medgem_home() / "gguf-index")
    tokenizer = Tokenizer.from_gguf(index, medgem_home() / "tokenizers")
    return bench_prompt(lambda text: tokenizer.encode(text, add_bos=True), n)


def run_medgem(mode: str, ids: list[int], new: int, runs: int) -> dict:
    import medgem  # noqa: I001 (before torch, as in the CLI: it sets PyTorch's allocation defaults)
    from medgem.bench import measure, quantized_kernel, timed_generation
    from medgem.engine.sampling import SamplingParams
    import torch

    torch.set_num_threads(THREADS)
    engine = f"medgem-{mode}"
    lookup = mode.endswith("-lookup")  # prompt lookup decoding (--draft lookup)
    mode = mode.removesuffix("-lookup")
    compiled = mode.endswith("-compiled")  # Pipeline.compile(): torch.compile, timed apart from loading
    mode = mode.removesuffix("-compiled")
    dtype, quant = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
                    "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}[mode]
    t0 = time.perf_counter()
    pipe = medgem.load(dtype=dtype, quant=quant)
    load_s = time.perf_counter() - t0
    if lookup:
        pipe.use_prompt_lookup(LOOKUP_TOKENS, LOOKUP_NGRAM)
    once = timed_generation(pipe, ids, new)
    compile_s = None
    if compiled:
        pipe.compile()
        start = time.perf_counter()
        once()  # compiles the prefill and the decode graphs
        compile_s = round(time.perf_counter() - start, 1)
    result = measure(once, load_s, len(ids), runs)
    if quant != "none":
        result["kernel"] = quantized_kernel(pipe.model)
    if compiled:
        result["first_run_with_compiling_s"] = compile_s
    if PROFILE:
        result["profile"] = profile_decode(pipe, ids, SamplingParams(max_new_tokens=new, ignore_eos=True), engine)
    return result


def profile_decode(pipe, ids: list[int], params, engine: str) -> str:
    """torch.profiler table of where one generation's time goes, written next to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in pipe.engine.stream([ids], [params]):
            pass
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    path = RESULTS / f"decode_profile_{engine}.txt"
    path.write_text(table)
    return str(path)


def run_transformers(ids: list[int], new: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from medgem.bench import measure
    from medgem.weights import embedded_gguf

    torch.set_num_threads(THREADS)
    path = embedded_gguf()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])

    def once():
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter()
            out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            end = time.perf_counter()
        # The second call repeats the prefill; subtract it so only decode steps remain.
        return first - start, (end - first) - (first - start), out.shape[1] - len(ids)

    return measure(once, load_s, len(ids), runs)


def run_llama_cpp(ids: list[int], new: int, runs: int, lookup: bool = False) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from medgem.bench import measure
    from medgem.weights import embedded_gguf

    draft = LlamaPromptLookupDecoding(max_ngram_size=LOOKUP_NGRAM, num_pred_tokens=LOOKUP_TOKENS) if lookup else None
    t0 = time.perf_counter()
    llm = Llama(model_path=str(embedded_gguf()), n_threads=THREADS, n_ctx=len(ids) + new + LOOKUP_TOKENS + 8,
                verbose=False, draft_model=draft)
    load_s = time.perf_counter() - t0

    def once():
        llm.reset()
        start, first, count = time.perf_counter(), None, 0
        for _ in llm.create_completion(ids[1:] if ids[0] == llm.token_bos() else ids, max_tokens=new,
                                       temperature=0.0, stream=True, logit_bias={llm.token_eos(): -1e9}):
            if first is None:
                first = time.perf_counter()
            count += 1
        return first - start, time.perf_counter() - first, count

    return measure(once, load_s, len(ids), runs)


def combine(rounds: list[dict]) -> dict:
    """One engine's rounds as one result: medians over every run, the highest peak RSS."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    out = dict(ok[-1])
    runs = [d for r in ok for d in r["decode_tok_s_runs"]]
    out["decode_tok_s"] = round(statistics.median(runs), 2)
    out["decode_tok_s_runs"] = runs
    out["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in ok]
    for key in ("prefill_tok_s", "load_s"):
        out[key] = round(statistics.median(r[key] for r in ok), 2)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["peak_rss_mb_rounds"] = [r["peak_rss_mb"] for r in ok]  # a first compile from scratch peaks higher
    if "first_run_with_compiling_s" in out:
        out["first_run_with_compiling_s"] = [r["first_run_with_compiling_s"] for r in ok]
    return out


def worker(engine: str, ids: list[int], new: int, runs: int) -> dict:
    if engine.startswith("medgem-"):
        return run_medgem(engine.split("-", 1)[1], ids, new, runs)
    if engine == "transformers":
        return run_transformers(ids, new, runs)
    if engine in ("llama.cpp", "llama.cpp-lookup"):
        return run_llama_cpp(ids, new, runs, lookup=engine.endswith("-lookup"))
    raise SystemExit(f"unknown engine {engine}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run every engine this many times, taking turns")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler table per medgem engine")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.ids), args.new_tokens, args.runs)))
        return
    ids = prompt_ids(args.prompt_tokens)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MEDGEM_BENCH_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               MEDGEM_BENCH_PROFILE="1" if args.profile else "0")
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # engines take turns, so a slower spell of the machine hits every one
        for engine in args.engines.split(","):
            cmd = [sys.executable, __file__, "--worker", engine, "--ids", json.dumps(ids),
                   "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                rounds.setdefault(engine, []).append({"error": tail})
            else:
                rounds.setdefault(engine, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(engine, rounds[engine][-1], flush=True)
    results = {engine: combine(runs) for engine, runs in rounds.items()}
    base = results.get("transformers", {}).get("decode_tok_s")
    for name, r in results.items():
        if "decode_tok_s" not in r:
            continue
        if base:
            r["decode_vs_transformers"] = round(r["decode_tok_s"] / base, 2)
        peer = results.get("llama.cpp-lookup" if name.endswith("-lookup") else "llama.cpp", {})  # like with like
        if peer.get("decode_tok_s"):
            r["decode_vs_llama_cpp"] = round(r["decode_tok_s"] / peer["decode_tok_s"], 2)
            if len(r["decode_tok_s_rounds"]) > 1:
                r["decode_vs_llama_cpp_rounds"] = [
                    round(a / b, 2) for a, b in zip(r["decode_tok_s_rounds"], peer["decode_tok_s_rounds"])]
    report = {
        "benchmark": "decode",
        "model": "gemma-3-270m-q4_k_m.gguf (embedded default)",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
