"""Image encode time: medgem's SigLIP tower vs transformers' SiglipVisionModel, same weights, one run.

Real So400m shapes at 896 px (27 layers, hidden 1152, 16 heads, MLP 4304: what MedGemma 4B/27B
run per image) with random weights, since no vision weights ship offline. Runs alternate between the
two so background load hits both alike; medians of wall time and of process CPU time (which other
processes on a shared machine do not inflate) are reported. Writes benchmarks/results/encode.json.

    .venv/bin/python benchmarks/encode.py [--layers 27] [--repeats 3] [--dtype float32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from medgem.config import VISION_PRESETS, replace
from medgem.nn.vision import SiglipVisionTower
from medgem.weights import resolve_dtype

RESULTS = Path(__file__).parent / "results" / "encode.json"


def timed(fn, pixels) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process across its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn(pixels)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=27, help="encoder layers (27 = the real tower)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation, after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    cfg = replace(VISION_PRESETS["so400m-896"], num_hidden_layers=args.layers)
    torch.manual_seed(0)
    theirs = SiglipVisionModel(SiglipVisionConfig(**cfg.to_dict())).eval().to(dtype)
    ours = SiglipVisionTower(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    ours.to(dtype)
    pixels = (torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1).to(dtype)

    runners = {"medgem": ours, "transformers": lambda p: theirs(pixel_values=p).last_hidden_state}
    with torch.inference_mode():
        max_diff = (ours(pixels).float() - theirs(pixel_values=pixels).last_hidden_state.float()).abs().max().item()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn, pixels))
            print(f"{name:>12}: {times[name][-1][0]:.2f} s wall, {times[name][-1][1]:.2f} s CPU", flush=True)

    median = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    median_cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    result = {
        "benchmark": "encode one 896 px image, SigLIP So400m (random weights)",
        "layers": args.layers,
        "dtype": args.dtype,
        "threads": args.threads,
        "seconds_median": median,
        "cpu_seconds_median": median_cpu,
        "runs_wall_cpu": times,
        "speedup_vs_transformers": median["transformers"] / median["medgem"],
        "cpu_ratio_vs_transformers": median_cpu["transformers"] / median_cpu["medgem"],
        "load_average_1min_at_end": os.getloadavg()[0],
        "max_abs_diff_last_hidden": max_diff,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "command": f"benchmarks/encode.py --layers {args.layers} --repeats {args.repeats} --dtype {args.dtype} "
                   f"--threads {args.threads}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("seconds_median", "cpu_seconds_median", "speedup_vs_transformers", "max_abs_diff_last_hidden")
    print(json.dumps({k: result[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
