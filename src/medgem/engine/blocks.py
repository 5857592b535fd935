"""Matmuls straight on llama.cpp's quantized blocks (blocks_avx2.c): the CPU kernel for GGUF weights.

Why: decode reads every weight once per token, so its speed is bytes per token. A Q4_K_M file holds
MedGemma 4B in 2.5 GB; rounding it to int8 (as the older path did) reads 4.3 GB a token and loading
took 46 s of dequantizing. Multiplying the file's own blocks (Q4_K, Q6_K, Q5_0, Q4_0, Q4_1, Q8_0) reads
what the file holds, keeps its precision exactly, and lets the weights stay in the file: a model is a
memory map of it (weights/gguf_reader.py), so a start costs what llama.cpp's does. Activations are
rounded to int8 in blocks of 32 (llama.cpp's Q8_0), as our VNNI kernel does.

The kernel needs AVX2, FMA and F16C (every x86 laptop since 2013-2015) and a C compiler; elsewhere,
or with MEDGEM_BLOCKS=0, `available()` is False and the engine keeps PyTorch's int8/int4 kernels. On a
CPU with AVX-512 VNNI the same source is built with 512-bit Q4_K, Q6_K and Q8_0 dots (1.4-1.6x the AVX2
build's arithmetic rate in cache; decode of a 4B streams memory either way, see BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medgem.engine import ckernel

SOURCE = Path(__file__).with_name("blocks_avx2.c")
CPU_FLAGS = ("avx2", "fma", "f16c")
# -ffp-contract=off: no fused multiply-adds the source did not ask for, so every row's arithmetic is
# the same instructions whether it is computed alone or among four (batch invariance).
CFLAGS = ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]
# The same source built for AVX-512 VNNI takes its 512-bit Q4_K, Q6_K and Q8_0 dots (MEDGEM_BLOCKS_AVX512=0
# keeps the AVX2 build on such a CPU).
WIDE_CPU_FLAGS = (*CPU_FLAGS, "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
WIDE_CFLAGS = [*CFLAGS, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]

# ggml type number -> (name, weights per block, bytes per block): the types the kernel reads.
TYPES = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 8: ("Q8_0", 32, 34),
         12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210)}
Q8_0, Q4_1 = 8, 3  # what dense weights are rounded to for int8 and int4


def _wide() -> bool:
    return os.environ.get("MEDGEM_BLOCKS_AVX512", "1") != "0" and set(WIDE_CPU_FLAGS) <= ckernel.cpu_flags()


@cache
def _library() -> ctypes.CDLL | None:
    lib = ckernel.load(SOURCE, *((WIDE_CFLAGS, WIDE_CPU_FLAGS) if _wide() else (CFLAGS, CPU_FLAGS)), "MEDGEM_BLOCKS")
    if lib is None:
        return None
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.medgem_block_linear.argtypes = [P, INT, I64, I64, INT, P, P, P, P, INT, INT]
    lib.medgem_block_linear.restype = INT
    lib.medgem_block_dequantize.argtypes = [P, INT, I64, I64, P, INT]
    lib.medgem_block_dequantize.restype = INT
    return lib


def available() -> bool:
    return _library() is not None


def kernel_name() -> str:
    if not available():
        return "PyTorch"
    return f"medgem {'AVX-512 VNNI' if _wide() else 'AVX2'} on GGUF blocks (int8 activations in blocks of 32)"


def row_bytes(kind: int, in_features: int) -> int | None:
    """Bytes of one row of `in_features` weights stored as ggml type `kind`; None where the kernel
    cannot take that type or width."""
    if kind not in TYPES:
        return None
    _, block, size = TYPES[kind]
    return in_features // block * size if in_features % block == 0 else None


# Prefill: from this many activation rows, a bf16 call dequantizes the weights a tile at a time and multiplies
# in bf16 (oneDNN), where the CPU has AVX512-BF16 or AMX: measured at 4B shapes on AVX-512 VNNI + BF16 (Zen 5),
# 32 rows take 0.6-1.2x the integer kernel's time and 128-512 rows 0.35-0.55x (benchmarks/scale.py). Below it
# (decode, small batches) the integer kernel reads the blocks once, as memory bandwidth asks.
PREFILL_ROWS = 32
TILE_BYTES = 8 << 20  # a tile of dequantized rows: 1-8 MiB measured, 8 best (fewer, larger GEMMs)
_tiles = threading.local()  # each thread's tile buffer, kept: a fresh 8 MiB would page-fault at every call


def prefill_in_bf16() -> bool:
    """Whether many-row calls take the dequantize-and-bf16-GEMM route (MEDGEM_BLOCKS_PREFILL=0: never)."""
    return os.environ.get("MEDGEM_BLOCKS_PREFILL", "1") != "0" and ckernel.native_bf16()


def _prefill_linear(x: torch.Tensor, segments: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """x @ W.T in bf16 on W dequantized a tile of rows at a time (bitwise gguf's weights rounded to bf16):
    each output is a bf16 GEMM's float32 sum of exact bf16 products, so it differs from the integer
    kernel's (int8-rounded activations) by rounding only."""
    k = x.shape[1]
    out = torch.empty(x.shape[0], sum(b.shape[0] for b, _ in segments), dtype=torch.bfloat16)
    tile_rows = max(16, TILE_BYTES // (2 * k))
    tile = getattr(_tiles, "buffer", None)
    if tile is None or tile.numel() < tile_rows * k:
        tile = _tiles.buffer = torch.empty(tile_rows * k, dtype=torch.bfloat16)
    tile = tile[:tile_rows * k].view(tile_rows, k)
    col = 0
    for blocks, kind in segments:
        for start in range(0, blocks.shape[0], tile_rows):
            part = blocks[start:start + tile_rows]
            n = part.shape[0]
            _dequantize_into(part, kind, k, tile)
            out[:, col:col + n] = x @ tile[:n].T
            col += n
    return out


def linear(x: torch.Tensor, segments: Sequence[tuple[torch.Tensor, int]], out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bf16 or float32, dense) @ W.T, W the segments' rows stacked; each segment is
    (blocks uint8 [rows, row_bytes], ggml type). From PREFILL_ROWS bf16 rows on, see `_prefill_linear`."""
    # The C code trusts its pointers and sizes: anything else would read or write out of bounds.
    if (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 2
            or not x.is_contiguous() or out_dtype not in (torch.float32, torch.bfloat16) or not segments):
        raise TypeError(f"block kernel: needs dense bf16/float32 CPU activations [M, K] and a float32 or bf16 "
                        f"output; got {tuple(x.shape)} {x.dtype} on {x.device.type}, output {out_dtype}")
    k = x.shape[1]
    for blocks, kind in segments:
        if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous()
                or blocks.device.type != "cpu" or row_bytes(kind, k) != blocks.shape[1]):
            raise TypeError(f"block kernel: a weight of ggml type {kind} {tuple(blocks.shape)} {blocks.dtype} does "
                            f"not hold rows of {k} inputs (or the type is not one of {sorted(TYPES)})")
    rows = [blocks.shape[0] for blocks, _ in segments]
    if x.shape[0] >= PREFILL_ROWS and x.dtype == out_dtype == torch.bfloat16 and prefill_in_bf16():
        return _prefill_linear(x, segments)
    out = torch.empty(x.shape[0], sum(rows), dtype=out_dtype)
    if not x.shape[0] or not out.shape[1]:
        return out
    n = len(segments)
    status = _library().medgem_block_linear(
        x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], k, n,
        (ctypes.c_int64 * n)(*(blocks.data_ptr() for blocks, _ in segments)), (ctypes.c_int64 * n)(*rows),
        (ctypes.c_int32 * n)(*(kind for _, kind in segments)), out.data_ptr(), out_dtype == torch.float32,
        torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"block kernel: no memory for {x.shape[0]} activation rows")
    if status:
        raise TypeError(f"block kernel: refused the weights ({status})")
    return out


def dequantize_bf16(blocks: torch.Tensor, kind: int, in_features: int) -> torch.Tensor:
    """Blocks [rows, row_bytes] -> bf16 weights [rows, K]: gguf's dequantized floats rounded to bf16, bitwise."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous() or row_bytes(kind, in_features) != blocks.shape[1]:
        raise TypeError(f"block kernel: a weight of ggml type {kind} {tuple(blocks.shape)} does not hold rows of {in_features} inputs")
    out = torch.empty(blocks.shape[0], in_features, dtype=torch.bfloat16)
    if blocks.shape[0]:
        _dequantize_into(blocks, kind, in_features, out)
    return out


def _dequantize_into(blocks: torch.Tensor, kind: int, in_features: int, out: torch.Tensor) -> None:
    """The C dequantizer on checked operands: blocks' rows into the first rows of bf16 `out`."""
    _library().medgem_block_dequantize(blocks.data_ptr(), kind, blocks.shape[0], in_features, out.data_ptr(),
                                       torch.get_num_threads())


@torch.library.custom_op("medgem::block_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weights: list[torch.Tensor], kinds: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    return linear(x, list(zip(weights, kinds, strict=True)), out_dtype)


@_linear_op.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor], kinds: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights), dtype=out_dtype)


def traceable_linear(x: torch.Tensor, segments: Sequence[tuple[torch.Tensor, int]], out_dtype: torch.dtype):
    """`linear`, as an operator when torch.compile traces it or a profiler runs; else a direct call."""
    if torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled:
        return _linear_op(x, [b for b, _ in segments], [k for _, k in segments], out_dtype)
    return linear(x, segments, out_dtype)


def quantize(weight: torch.Tensor, kind: int) -> torch.Tensor:
    """Dense float rows [N, K] -> blocks of ggml type `kind` (Q8_0 or Q4_1), by gguf's own quantizer."""
    import gguf

    out = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType(kind))
    return torch.from_numpy(np.ascontiguousarray(out))


def dequantize(blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """Blocks -> float32 rows, by gguf's numpy dequantizers (the reference the kernel is tested against)."""
    import gguf

    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(kind)),
                                     dtype=np.float32))


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as the dense [M, K] bf16 or float32 rows the kernel takes (a batch's slice may be strided)."""
    flat = x.reshape(-1, in_features)
    return (flat if flat.dtype in (torch.bfloat16, torch.float32) else flat.float()).contiguous()


class BlockLinear(nn.Module):
    """y = x @ W.T with W held as ggml blocks: the file's own (a view of its memory map) or ours.

    `out_dtype` fixes the output's dtype (float32 for an LM head); by default it is the input's.
    """

    def __init__(self, blocks: torch.Tensor, kind: int, in_features: int, out_dtype: torch.dtype | None = None):
        super().__init__()
        if row_bytes(kind, in_features) != blocks.shape[1]:
            raise TypeError(f"ggml type {kind} rows of {in_features} inputs are not {blocks.shape[1]} bytes")
        self.register_buffer("qweight", blocks)
        self.kind, self.in_features, self.out_features, self.out_dtype = kind, in_features, blocks.shape[0], out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = traceable_linear(_rows(x, self.in_features), [(self.qweight, self.kind)], self.out_dtype or x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.kind)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={TYPES[self.kind][0]}"

    @classmethod
    def stacked(cls, parts: tuple[BlockLinear, ...]) -> StackedBlocks:
        return StackedBlocks(parts)


class StackedBlocks:
    """Several BlockLinears that read the same input (q, k, v) as one kernel call, outputs side by side.
    It reads the parts' weights at each call, so it never holds a copy or a stale reference."""

    def __init__(self, parts: tuple[BlockLinear, ...]):
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = traceable_linear(_rows(x, self.parts[0].in_features), [(p.qweight, p.kind) for p in self.parts], x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])
