"""MedGemma at its real sizes: medgem against llama.cpp on the same GGUF files, in one run.

The 270M's speed says little about MedGemma 4B/27B, whose weights stream from DRAM every token. No
MedGemma weights can be downloaded here, so this writes random-weight Gemma 3 checkpoints at the
published text shapes (config.TEXT_PRESETS: 1b, 4b, 27b) as f16 GGUF, streamed tensor by tensor
(weights/export.py: a 27B never sits in memory whole), quantizes them with llama.cpp's own quantizer
(Q4_K_M, Q8_0), and times every engine on the same file, each in its own process:

  load_s            first start of a fresh process (the file read into the page cache just before, so a
                    cold disk does not decide which engine looks faster)
  second_start_s    medgem only: a second fresh process on the same file
  prefill_tok_s     128-token prompt: prompt tokens / time to the first token (median of --runs)
  prefill_2048_tok_s  a 2,048-token prompt, once
  decode_tok_s      greedy decode after the 128-token prompt, (new tokens - 1) / time (median)
  peak_rss_mb       the worker's peak resident memory (mapped file pages included, for both engines)

Writes benchmarks/results/scale.json and prints a markdown table of ratios to llama.cpp.

    python benchmarks/scale.py --sizes 4b --quants Q4_K_M,Q8_0 --workdir /tmp/scale --rounds 3
    python benchmarks/scale.py --sizes 4b --quants Q4_K_M --engines llama.cpp,medgem-int4 --llama-python /venv/bin/python

llama.cpp comes from llama-cpp-python, which may live in another environment (--llama-python; its
build for this CPU is in ../shared/ENVIRONMENT.md). Checkpoints are reused when present in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("MEDGEM_BENCH_THREADS", "2"))
ENGINES = ["llama.cpp", "medgem-default", "medgem-int8"]  # also medgem-int4, medgem-gguf, medgem-none
FTYPES = {"Q4_K_M": 15, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


def write_random(size: str, path: Path, tensor_type: str = "f16") -> Path:
    """A random-weight Gemma 3 text checkpoint at `size`'s shapes, as an f16 (or q8_0: a 27B's f16 is 54 GB)
    GGUF, one tensor at a time."""
    import torch

    from medgem.config import TEXT_PRESETS
    from medgem.nn.text import Gemma3Text
    from medgem.weights import embedded_gguf
    from medgem.weights.export import export_gguf_tensors

    cfg = TEXT_PRESETS[size]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma3Text(cfg).state_dict().items() if k != "lm_head.weight"}

    def maker(i: int, shape: tuple[int, ...], norm: bool):
        def make():
            g = torch.Generator().manual_seed(i)
            return torch.randn(shape, generator=g, dtype=torch.float16) * (0.1 if norm else 0.02)
        return make

    tensors = {k: (s, maker(i, s, k.endswith("norm.weight"))) for i, (k, s) in enumerate(shapes.items())}
    return export_gguf_tensors(cfg, tensors, path, embedded_gguf(), tensor_type, name=f"random gemma3 {size}")


def checkpoint(size: str, quant: str, workdir: Path, llama_python: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"gemma3-{size}-random-{quant}.gguf"
    if target.exists():
        return target
    # The source llama.cpp quantizes from: f16, or Q8_0 where f16 would not fit the disk (requantized, so a
    # 27B's Q4_K_M rounds random weights twice; speed does not depend on their values).
    source_type = "q8_0" if size == "27b" else "f16"
    source = target if source_type == "q8_0" and quant == "Q8_0" else workdir / f"gemma3-{size}-random-{source_type}.gguf"
    if not source.exists():
        start = time.perf_counter()
        partial = source.with_suffix(".writing")
        write_random(size, partial, source_type)
        partial.replace(source)
        print(f"wrote {source.name} in {time.perf_counter() - start:.0f} s", flush=True)
    if source == target:
        return target
    code = ("import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]);"
            "p.nthread = int(sys.argv[4]); p.allow_requantize = True;"
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    start = time.perf_counter()
    partial = target.with_suffix(".partial")
    subprocess.run([llama_python, "-c", code, str(source), str(partial), str(FTYPES[quant]), str(THREADS)], check=True)
    partial.replace(target)
    print(f"quantized {target.name} with llama.cpp in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def prompt(n: int) -> list[int]:
    """BOS then random ordinary token ids: the same for every engine."""
    import random

    rng = random.Random(n)
    return [2] + [rng.randrange(1000, 200_000) for _ in range(n - 1)]


def run_medgem(path: str, mode: str, new: int, runs: int) -> dict:
    import medgem  # noqa: I001 - before torch, as in the CLI
    import torch

    from medgem.bench import measure, timed_generation
    from medgem.engine import blocks

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    pipe = medgem.load(path, quant=None if mode == "default" else mode)
    load_s = time.perf_counter() - start
    result = measure(timed_generation(pipe, prompt(128), new), load_s, 128, runs)
    long_first, _, _ = timed_generation(pipe, prompt(2048), 2)()
    result["prefill_2048_tok_s"] = round(2048 / long_first, 1)
    result["kernel"] = medgem.bench.quantized_kernel(pipe.model)
    result["quant"] = getattr(pipe.model, "quantization", mode)
    result["prefill_kernel"] = "bf16 GEMM on dequantized tiles" if blocks.prefill_in_bf16() else result["kernel"]
    result["peak_rss_mb"] = round(medgem.bench.peak_rss_mb(), 1)
    return result


def run_llama_cpp(path: str, new: int, runs: int) -> dict:
    import resource

    from llama_cpp import Llama

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start = time.perf_counter()
    llm = Llama(model_path=path, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048 + 64, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - start

    def once(ids: list[int], tokens: int):
        llm.reset()
        begin, first, count = time.perf_counter(), None, 0
        for _ in llm.create_completion(ids[1:], max_tokens=tokens, temperature=0.0, stream=True,
                                       logit_bias={llm.token_eos(): -1e9}):
            if first is None:
                first = time.perf_counter()
            count += 1
        return first - begin, time.perf_counter() - first, count

    once(prompt(128), new)  # warm-up, as medgem's measure() does
    samples = [once(prompt(128), new) for _ in range(runs)]
    long_first, _, _ = once(prompt(2048), 2)
    prefill = sorted(128 / s[0] for s in samples)
    decode = sorted((s[2] - 1) / s[1] for s in samples)
    return {"load_s": round(load_s, 2), "prefill_tok_s": round(prefill[len(prefill) // 2], 1),
            "decode_tok_s": round(decode[len(decode) // 2], 2), "decode_tok_s_runs": [round(d, 2) for d in decode],
            "prefill_2048_tok_s": round(2048 / long_first, 1), "peak_rss_mb": round(peak_mb(), 1)}


def warm_page_cache(path: Path) -> None:
    """Read the whole file once, so every engine's first start finds it in the page cache."""
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def worker_result(python: str, engine: str, path: Path, new: int, runs: int) -> dict:
    warm_page_cache(path)
    out = subprocess.run([python, __file__, "--worker", engine, "--file", str(path), "--new-tokens", str(new),
                          "--runs", str(runs)], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_result(rounds: list[dict]) -> dict:
    """Each numeric figure's median over the rounds (the rounds themselves kept), or the first error."""
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    out = dict(rounds[-1])
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = sorted(r[key] for r in rounds if r.get(key) is not None)
            out[key] = values[len(values) // 2] if values else None
    out["rounds"] = rounds
    return out


def table(results: dict) -> str:
    lines = ["| model | engine | load s | 2nd start s | prefill 128 tok/s | prefill 2048 tok/s | decode tok/s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, engines in results.items():
        peer = engines.get("llama.cpp", {})
        for engine, r in engines.items():
            if "error" in r:
                lines.append(f"| {name} | {engine} | error: {r['error'][:80]} |||||||")
                continue

            def cell(key, digits=1, r=r, engine=engine, peer=peer):
                value = r.get(key)
                if value is None:
                    return "-"
                ratio = f" ({value / peer[key]:.2f}x)" if engine != "llama.cpp" and peer.get(key) else ""
                return f"{value:.{digits}f}{ratio}"

            lines.append(f"| {name} | {engine} | {cell('load_s', 2)} | {cell('second_start_s', 2)} | "
                         f"{cell('prefill_tok_s')} | {cell('prefill_2048_tok_s')} | {cell('decode_tok_s', 2)} | "
                         f"{r['peak_rss_mb'] / 1024:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4b", help="comma-separated: 1b, 4b, 27b")
    ap.add_argument("--quants", default="Q4_K_M,Q8_0")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--workdir", default="/tmp/medgem-scale")
    ap.add_argument("--llama-python", default=os.environ.get("MEDGEM_LLAMA_PYTHON", sys.executable))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every engine this many times, interleaved; "
                    "the table shows medians")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = (run_llama_cpp(args.file, args.new_tokens, args.runs) if args.worker == "llama.cpp"
                  else run_medgem(args.file, args.worker.split("-", 1)[1], args.new_tokens, args.runs))
        print(json.dumps(result))
        return
    results: dict[str, dict] = {}
    for size in args.sizes.split(","):
        for quant in args.quants.split(","):
            path = checkpoint(size, quant, Path(args.workdir), args.llama_python)
            name = f"{size} {quant} ({path.stat().st_size / 1e9:.2f} GB)"
            rounds: dict[str, list[dict]] = {engine: [] for engine in args.engines.split(",")}
            for _ in range(args.rounds):  # engines interleaved: this host's memory bandwidth drifts by minutes
                for engine in rounds:
                    python = args.llama_python if engine == "llama.cpp" else sys.executable
                    r = worker_result(python, engine, path, args.new_tokens, args.runs)
                    if engine.startswith("medgem") and "error" not in r:  # a second fresh process: the mapped start
                        again = worker_result(python, engine, path, 2, 1)
                        r["second_start_s"] = again.get("load_s")
                    rounds[engine].append(r)
                    print(name, engine, json.dumps(r), flush=True)
            results[name] = {engine: median_result(rs) for engine, rs in rounds.items()}
    report = {"host": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                       "cpu_count": os.cpu_count()}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
