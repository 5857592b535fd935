"""Image encode time: medgem's SigLIP tower vs transformers' SiglipVisionModel, same weights, one run.

Real So400m shapes at 896 px (27 layers, hidden 1152, 16 heads, MLP 4304: what MedGemma 4B/27B
run per image) with random weights, since no vision weights ship offline. Each engine runs in each
dtype asked for; runs alternate so background load hits all alike; medians of wall time and of process
CPU time (which other processes on a shared machine do not inflate) are reported. Quality is the
cosine between each run's image features after MedGemma's projector (pool, RMSNorm, linear to the 4B's
2560) and medgem fp32's, the features the decoder reads. Writes benchmarks/results/encode.json.

    .venv/bin/python benchmarks/encode.py [--layers 27] [--repeats 3] [--warmup 1] [--runs medgem:float32,transformers:bfloat16] [--threads N]

Why both dtypes: bf16 halves the work only where the CPU multiplies bf16 natively (AVX512-BF16, AMX);
elsewhere PyTorch emulates it, and the flags below say which case a run measured.
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
import torch.nn.functional as F

from medgem.config import MULTIMODAL_PRESETS, VISION_PRESETS, replace
from medgem.engine import ckernel
from medgem.nn.medgemma import MultiModalProjector
from medgem.nn.vision import SiglipVisionTower
from medgem.weights import resolve_dtype

RESULTS = Path(__file__).parent / "results" / "encode.json"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def timed(fn, pixels) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of this process across its threads, output)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = fn(pixels)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=27, help="encoder layers (27 = the real tower)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and dtype")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (0: an 896 px image is already "
                        "seconds of large matmuls, so a warm-up changes little)")
    parser.add_argument("--runs", default="medgem:float32,transformers:float32,medgem:bfloat16,transformers:bfloat16",
                        help="comma-separated ENGINE:DTYPE (engines medgem, transformers; dtypes float32, bfloat16)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.set_num_threads(args.threads)
    cfg = replace(VISION_PRESETS["so400m-896"], num_hidden_layers=args.layers)
    torch.manual_seed(0)
    reference = SiglipVisionModel(SiglipVisionConfig(**cfg.to_dict())).eval()
    projector = MultiModalProjector(replace(MULTIMODAL_PRESETS["4b"], vision=cfg)).eval()
    projector.mm_input_projection_weight.data.normal_(0, cfg.hidden_size**-0.5)
    pixels = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1

    runners = {}
    for run_spec in args.runs.split(","):
        engine, name = run_spec.split(":")
        dtype = resolve_dtype(name)
        if engine == "medgem":
            model = SiglipVisionTower(cfg).eval()
            model.load_state_dict(reference.state_dict())
            runners[f"medgem {name}"] = (model.to(dtype), dtype)
        else:
            twin = SiglipVisionModel(SiglipVisionConfig(**cfg.to_dict())).eval()
            twin.load_state_dict(reference.state_dict())
            twin.to(dtype)
            runners[f"transformers {name}"] = (lambda p, m=twin: m(pixel_values=p).last_hidden_state, dtype)
    del reference

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    features: dict[str, torch.Tensor] = {}
    for run in range(args.warmup + args.repeats):
        for name, (fn, dtype) in runners.items():
            wall, cpu, out = timed(fn, pixels.to(dtype))
            if name not in features:
                with torch.inference_mode():
                    features[name] = projector(out.float())
            if run < args.warmup:
                continue
            times[name].append((wall, cpu))
            print(f"{name:>22}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)

    reference_name = "medgem float32" if "medgem float32" in features else next(iter(features))
    base = features[reference_name]
    median = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    median_cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    cosine = {name: F.cosine_similarity(f.flatten(1).double(), base.flatten(1).double()).min().item()
              for name, f in features.items()}
    flags = ckernel.cpu_flags()
    result = {
        "benchmark": "encode one 896 px image, SigLIP So400m (random weights) + MedGemma 4B projector",
        "layers": args.layers,
        "threads": args.threads,
        "cpu_has_native_bf16": sorted(set(BF16_FLAGS) & flags) or False,
        "seconds_median": median,
        "cpu_seconds_median": median_cpu,
        "runs_wall_cpu": times,
        "time_vs_transformers_bf16": ({name: t / median["transformers bfloat16"] for name, t in median.items()}
                                      if "transformers bfloat16" in median else None),
        "projector_cosine_vs": reference_name,
        "projector_cosine": cosine,
        "load_average_1min_at_end": os.getloadavg()[0],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "command": f"benchmarks/encode.py --layers {args.layers} --repeats {args.repeats} --warmup {args.warmup} "
                   f"--runs {args.runs} "
                   f"--threads {args.threads}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("seconds_median", "cpu_seconds_median", "time_vs_transformers_bf16", "projector_cosine")
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
