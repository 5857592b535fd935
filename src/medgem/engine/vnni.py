"""int8 x int8 matmuls on AVX-512 VNNI: the decoding kernel for int8 weights (int8_vnni.c).

Why our own kernel: PyTorch's `_weight_int8pack_mm` converts every int8 weight to float and multiplies
in float32, which caps it near 29 GB/s of weights on 2 cores here, and at 8 rows it does that work
8 times (measured: 4.2 ms a token for the 270M's 72 layer matmuls). Rounding the activations to int8
as well, in blocks of 32 with a scale each (llama.cpp's Q8_0 for activations), lets one `vpdpbusd`
multiply 64 weight bytes: the same matmuls take 2.0 ms at 1 row, and 8 rows 4.1 ms instead of 9.1.
Perplexity on the 270M is unchanged by the block-rounded activations (17.445 against 17.448,
benchmarks/quant_quality.py). No maintained library ships this kernel for PyTorch on x86 (torchao's
CPU kernels are not in its PyPI wheel), so it is ~100 lines of C here.

It is compiled on first use (engine/ckernel.py). Where the CPU lacks AVX-512 VNNI, no compiler is
found, or MEDGEM_VNNI=0, `available()` is False and the engine keeps PyTorch's kernel.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from medgem.engine import ckernel

SOURCE = Path(__file__).with_name("int8_vnni.c")
PANEL, BLOCK = 16, 32  # rows per weight panel, activations per scale (as in the C source)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")  # what CFLAGS let the compiler use
CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]


@cache
def _library() -> ctypes.CDLL | None:
    lib = ckernel.load(SOURCE, CFLAGS, CPU_FLAGS, "MEDGEM_VNNI")
    if lib is None:
        return None
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.medgem_int8_linear.argtypes = [P, P, P, I64, I64, I64, P, ctypes.c_int, ctypes.c_int]
    lib.medgem_int8_linear.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


def kernel_name() -> str:
    """Which kernel int8 weights run on here, for benchmark reports."""
    return "medgem AVX-512 VNNI (int8 activations in blocks of 32)" if available() else "PyTorch _weight_int8pack_mm"


def fits(out_features: int, in_features: int) -> bool:
    """Whether a weight of this shape can use the kernel (whole panels, whole activation blocks)."""
    return available() and out_features % PANEL == 0 and in_features % BLOCK == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 rows [N, K] -> the kernel's panels [N/16, K/4, 16, 4] of unsigned bytes (q + 128)."""
    n, k = q.shape
    unsigned = q.contiguous().view(torch.uint8) ^ 0x80  # two's complement: q + 128 flips the top bit
    return unsigned.view(n // PANEL, PANEL, k // 4, 4).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor) -> torch.Tensor:
    """The int8 rows [N, K] back from `pack`'s panels."""
    p, quads = panels.shape[:2]
    return (panels.transpose(1, 2).reshape(p * PANEL, quads * 4) ^ 0x80).view(torch.int8)


def linear(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bf16, dense) @ W.T with W = unpack(panels) * scales[:, None]; float32 or bf16 out."""
    # The C code trusts its pointers and sizes, so anything else would read or write out of bounds.
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous()
            or panels.dtype != torch.uint8 or not panels.is_contiguous() or panels.shape[1] * 4 != x.shape[1]
            or scales.shape != (panels.shape[0] * PANEL,) or out_dtype not in (torch.float32, torch.bfloat16)):
        raise TypeError(f"int8 VNNI kernel: needs dense bf16 CPU activations [M, {panels.shape[1] * 4}], "
                        f"uint8 panels with one scale a row, and a float32 or bf16 output; got {tuple(x.shape)} "
                        f"{x.dtype} on {x.device.type}")
    scales = scales.float()  # a model's .to(dtype) may have turned them bf16; a no-op otherwise
    out = torch.empty(x.shape[0], scales.shape[0], dtype=out_dtype)
    if not x.shape[0]:
        return out
    status = _library().medgem_int8_linear(panels.data_ptr(), scales.data_ptr(), x.data_ptr(), x.shape[0],
                                           scales.shape[0], x.shape[1], out.data_ptr(),
                                           out_dtype == torch.float32, torch.get_num_threads())
    if status:
        raise MemoryError(f"int8 VNNI kernel: no memory for {x.shape[0]} activation rows")
    return out


@torch.library.custom_op("medgem::int8_vnni_linear", mutates_args=())
def _linear_op(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return linear(x, panels, scales, out_dtype)


@_linear_op.register_fake
def _(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0], dtype=out_dtype)


def traceable_linear(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype):
    """`linear`, as an operator when torch.compile traces it (a graph can hold no ctypes call) or a
    profiler runs (so profiles show the kernel); eagerly a direct call, 2-3 us cheaper."""
    if torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled:
        return _linear_op(x, panels, scales, out_dtype)
    return linear(x, panels, scales, out_dtype)
