"""What bounds int8 decoding here: PyTorch's int8 kernels and medgem's VNNI kernel against a plain
streaming read.

Decode reads every weight once per token, so its floor is the memory bandwidth. This measures, at the
Gemma 3 270M's shapes (18 layers of 1536x640, 640x1024, 4096x640 and 640x2048 stacked projections;
a 262,144 x 640 LM head), random int8 weights, one row of activations, --threads threads:
- `stream`: `tensor.sum()` over 168 MB of float32, the bandwidth a simple kernel reaches;
- the 72 layer matmuls with `_weight_int8pack_mm` (bf16 activations, medgem's layer kernel), "hot"
  (one layer's weights, repeated: they stay in cache) and "cold" (the 18 layers in turn: each layer's
  weights come from memory, as in decoding), and oneDNN's int8 x int8 GEMM cold;
- the LM head with oneDNN's packed int8 GEMM (medgem's head where VNNI is missing), `torch._int_mm` and
  `_weight_int8pack_mm`;
- medgem's AVX-512 VNNI kernel (engine/vnni.py, activations rounded to int8 in blocks of 32) for the
  layers (hot and cold) and the head, where this CPU has it;
- the cold layers and the head again with 8 rows of activations, as when 8 sequences decode together.
Medians of --repeats timed calls after a warm-up. Writes benchmarks/results/int8_kernels.json.

    python benchmarks/int8_kernels.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations  # noqa: I001 (medgem is imported before torch on purpose, below)

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import medgem  # noqa: F401 (before torch: the same OpenMP and huge-page defaults as the engine)
import torch

from medgem.engine import vnni

RESULTS = Path(__file__).parent / "results"
LAYERS, HIDDEN, VOCAB = 18, 640, 262_144
SHAPES = [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]  # q+k+v, o, gate+up, down (out, in)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def int8_weights(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen), torch.rand(rows, generator=gen)


def onednn_row(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """One activation row rounded to int8 (as medgem's head does), times a packed int8 weight."""
    step = x.abs().amax().clamp(min=1e-8) / 127.0
    ints = (torch.round(x / step) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(ints, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS / "int8_kernels.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = [[int8_weights(n, k, gen) for n, k in SHAPES] for _ in range(LAYERS)]
    rows = {k: torch.randn(1, k, generator=gen) for _, k in SHAPES}
    layer_bytes = sum(n * k for n, k in SHAPES) * LAYERS

    bf16_rows = {k: r.bfloat16() for k, r in rows.items()}
    bf16_layers = [[(q, s.bfloat16()) for q, s in layer] for layer in layers]

    def woq(layer_list, batch=1):
        for layer in layer_list:
            for q, s in layer:
                torch.ops.aten._weight_int8pack_mm(bf16_rows[q.shape[1]].expand(batch, -1).contiguous(), q, s)

    zeros = {n: torch.zeros(n, dtype=torch.long) for n, _ in SHAPES}
    packed = [[(torch.ops.onednn.qlinear_prepack(q, None), s) for q, s in layer] for layer in layers]

    def onednn_layers():
        for layer, plain in zip(packed, layers):
            for (w, s), (q, _) in zip(layer, plain):
                onednn_row(rows[q.shape[1]], w, s, zeros[q.shape[0]])

    head_q, head_s = int8_weights(VOCAB, HIDDEN, gen)
    head_s_bf16 = head_s.bfloat16()
    head_packed, head_zeros = torch.ops.onednn.qlinear_prepack(head_q, None), torch.zeros(VOCAB, dtype=torch.long)
    x = torch.randn(1, HIDDEN, generator=gen)
    x_bf16 = x.bfloat16()
    x_int8 = torch.round(x / (x.abs().amax() / 127)).to(torch.int8)
    stream = torch.randn(VOCAB * HIDDEN // 4, generator=gen)  # as many bytes as the int8 head
    ms = {
        "stream_168MB": median_ms(stream.sum, args.repeats),
        "layers_int8pack_hot": median_ms(lambda: woq([bf16_layers[0]] * LAYERS), args.repeats),
        "layers_int8pack_cold": median_ms(lambda: woq(bf16_layers), args.repeats),
        "layers_onednn_int8_cold": median_ms(onednn_layers, args.repeats),
        "head_onednn_int8": median_ms(lambda: onednn_row(x, head_packed, head_s, head_zeros), args.repeats),
        "head_int_mm": median_ms(lambda: torch._int_mm(x_int8, head_q.T), args.repeats),
        "head_int8pack_bf16": median_ms(
            lambda: torch.ops.aten._weight_int8pack_mm(x_bf16, head_q, head_s_bf16), args.repeats),
    }
    ms["layers_int8pack_cold_8rows"] = median_ms(lambda: woq(bf16_layers, 8), args.repeats)
    ms["head_onednn_int8_8rows"] = median_ms(
        lambda: onednn_row(x.expand(8, -1), head_packed, head_s, head_zeros), args.repeats)
    if vnni.available():
        vnni_layers = [[(vnni.pack(q), s) for q, s in layer] for layer in layers]
        head_panels = vnni.pack(head_q)

        def vnni_run(layer_list, batch=1):
            for layer in layer_list:
                for panels, s in layer:
                    vnni.linear(bf16_rows[panels.shape[1] * 4].expand(batch, -1).contiguous(), panels, s,
                                torch.bfloat16)

        ms["layers_vnni_hot"] = median_ms(lambda: vnni_run([vnni_layers[0]] * LAYERS), args.repeats)
        ms["layers_vnni_cold"] = median_ms(lambda: vnni_run(vnni_layers), args.repeats)
        ms["layers_vnni_cold_8rows"] = median_ms(lambda: vnni_run(vnni_layers, 8), args.repeats)
        ms["head_vnni"] = median_ms(lambda: vnni.linear(x_bf16, head_panels, head_s, torch.float32), args.repeats)
        ms["head_vnni_8rows"] = median_ms(
            lambda: vnni.linear(x_bf16.expand(8, -1).contiguous(), head_panels, head_s, torch.float32), args.repeats)
    head_bytes = VOCAB * HIDDEN
    gb_s = {name: round((layer_bytes if name.startswith("layers") else head_bytes) / (t / 1e3) / 1e9, 1)
            for name, t in ms.items()}
    report = {
        "benchmark": "int8_kernels", "threads": args.threads, "repeats": args.repeats,
        "layer_bytes": layer_bytes, "head_bytes": head_bytes, "ms": ms, "gb_per_s": gb_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "load_avg_at_end": os.getloadavg()},
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
