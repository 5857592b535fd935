"""The block kernel (engine/blocks.py): its arithmetic on every GGUF type it reads, against gguf's own
numpy dequantizers; independence of the batch; refusals; the fallback; and the memory-mapped loader."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import medgem
from medgem.engine import blocks, ckernel
from medgem.engine.blocks import BlockLinear
from medgem.errors import CheckpointError
from medgem.weights import open_text_checkpoint

needs_blocks = pytest.mark.skipif(not blocks.available(), reason="this CPU has no AVX2/FMA/F16C (or no C compiler)")
KINDS = sorted(blocks.TYPES)


def random_blocks(kind: int, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random codes with small positive fp16 scales (random bytes there could be inf or NaN)."""
    rng = np.random.default_rng(seed)
    name, block, size = blocks.TYPES[kind]
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    scales = (rng.random((rows, k // block)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
    at = 208 if name == "Q6_K" else 0  # Q6_K keeps its d last
    raw[..., at:at + 2] = scales.reshape(rows, k // block, 2)
    if name in ("Q4_K", "Q4_1"):  # dmin / m
        raw[..., 2:4] = scales.reshape(rows, k // block, 2)
    return torch.from_numpy(raw.reshape(rows, -1).copy())


def block_rounded(x: torch.Tensor, width: int = 32) -> torch.Tensor:
    """The activations as the kernel sees them: int8 codes in blocks of `width` (32, or 256 for the
    K-quants) times each block's step, in float64. The codes are rounded in float32 as the C code
    rounds them (x * (127 / max|x|))."""
    b = x.float().reshape(x.shape[0], -1, width)
    amax = b.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)
    return (torch.round(b * inverse).double() * (amax / 127).double()).reshape(x.shape)


def reference(x: torch.Tensor, w: torch.Tensor, kind: int) -> torch.Tensor:
    return block_rounded(x, blocks.TYPES[kind][1]) @ blocks.dequantize(w, kind).double().T


@needs_blocks
@pytest.mark.parametrize("kind", KINDS, ids=[blocks.TYPES[k][0] for k in KINDS])
def test_kernel_is_the_block_arithmetic_of_gguf_types(kind):
    """Integer dots are exact and each group's scale is applied in float32: within float32 rounding of
    gguf's dequantized weights times the block-rounded activations, for 1-9 rows (4-row passes and
    single rows), bf16 and float32 inputs, and an odd number of 32-weight blocks where the type allows."""
    widths = [512, 1280] if blocks.TYPES[kind][1] == 256 else [96, 640]
    for k in widths:
        w = random_blocks(kind, 40, k)
        for m in (1, 4, 9):
            for dtype in (torch.bfloat16, torch.float32):
                x = (torch.randn(m, k) * torch.linspace(0.01, 20, m)[:, None]).to(dtype)
                y = blocks.linear(x, [(w, kind)], torch.float32)
                ref = reference(x, w, kind)
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6, (k, m, dtype)


needs_wide = pytest.mark.skipif(not (blocks.available() and blocks._wide()),
                                reason="no AVX-512 VNNI build here (CPU, compiler or MEDGEM_BLOCKS_AVX512=0)")


@needs_wide
def test_avx2_build_on_an_avx512_cpu_gives_the_same_arithmetic(tmp_path):
    """Both builds of the one source run here: the AVX2 one (what laptops get, MEDGEM_BLOCKS_AVX512=0) and
    the 512-bit one agree within float32 rounding on every type, 1 to 9 rows."""
    torch.manual_seed(0)
    cases = []
    for kind in KINDS:
        k = 1280 if blocks.TYPES[kind][1] == 256 else 640
        cases.append((kind, random_blocks(kind, 24, k, seed=kind), torch.randn(9, k).bfloat16()))
    torch.save(cases, tmp_path / "cases.pt")
    code = ("import sys, torch; from medgem.engine import blocks; cases = torch.load(sys.argv[1]);"
            "print(blocks.kernel_name());"
            "torch.save([blocks.linear(x, [(w, k)], torch.float32) for k, w, x in cases], sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cases.pt"), str(tmp_path / "avx2.pt")],
                         env={**os.environ, "MEDGEM_BLOCKS_AVX512": "0"}, capture_output=True, text=True, check=True)
    assert "AVX2" in out.stdout and "AVX-512" in blocks.kernel_name()
    for (kind, w, x), narrow in zip(cases, torch.load(tmp_path / "avx2.pt"), strict=True):
        wide = blocks.linear(x, [(w, kind)], torch.float32)
        assert ((wide - narrow).abs().max() / narrow.abs().max()).item() < 2e-6, blocks.TYPES[kind][0]


@needs_blocks
def test_real_q4_k_q6_k_and_q5_0_tensors_of_the_270m(embedded_gguf):
    """The file's own blocks (memory-mapped) give the file's weights: no re-rounding."""
    _, tensors, _ = open_text_checkpoint(embedded_gguf)
    seen = set()
    for name in ("layers.3.self_attn.o_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
                 "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.q_proj.weight"):
        rows = tensors[name]
        seen.add(blocks.TYPES[rows.ggml_type][0])
        x = torch.randn(3, rows.shape[1]).bfloat16()
        y = BlockLinear(rows.blocks(), rows.ggml_type, rows.shape[1], torch.float32)(x)
        ref = block_rounded(x, blocks.TYPES[rows.ggml_type][1]) @ rows.read().double().T
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6, name
    assert {"Q4_K", "Q5_0", "Q8_0"} <= seen


@needs_blocks
def test_rows_do_not_depend_on_their_batch(monkeypatch):
    """Alone, among 4, among 9, or past the kernel's chunk of activation rows: the same bits (the integer
    kernel; many-row bf16 calls may take the prefill route, tested below)."""
    monkeypatch.setenv("MEDGEM_BLOCKS_PREFILL", "0")
    k = 8192  # a chunk is 2 MiB of codes: 256 rows here, so 300 rows take two passes
    w = {kind: random_blocks(kind, 16, k, seed=kind) for kind in KINDS}
    x = torch.randn(300, k).bfloat16()
    for kind, weight in w.items():
        batched = blocks.linear(x, [(weight, kind)], torch.bfloat16)
        for i in (0, 3, 4, 7, 255, 256, 299):
            assert torch.equal(blocks.linear(x[i:i + 1], [(weight, kind)], torch.bfloat16), batched[i:i + 1])
        assert torch.equal(blocks.linear(x[5:14], [(weight, kind)], torch.bfloat16), batched[5:14])


@needs_blocks
@pytest.mark.parametrize("kind", KINDS, ids=[blocks.TYPES[k][0] for k in KINDS])
def test_dequantized_bf16_weights_are_ggufs_bitwise(kind):
    k = 1280 if blocks.TYPES[kind][1] == 256 else 640
    w = random_blocks(kind, 37, k, seed=kind)
    ours = blocks.dequantize_bf16(w, kind, k)
    assert torch.equal(ours.view(torch.int16), blocks.dequantize(w, kind).to(torch.bfloat16).view(torch.int16))
    with pytest.raises(TypeError, match="block kernel"):
        blocks.dequantize_bf16(w[:, :-1].contiguous(), kind, k)


@needs_blocks
@pytest.mark.skipif(not blocks.prefill_in_bf16(), reason="this CPU has no AVX512-BF16 or AMX")
def test_many_rows_multiply_dequantized_tiles_in_bf16(monkeypatch):
    """From PREFILL_ROWS bf16 rows on: q, k, v of different types in tiles smaller than a tensor (so tiles
    and segments both have edges), within bf16 rounding of x @ (gguf's weights in bf16).T; fewer rows
    stay on the integer kernel, bitwise."""
    monkeypatch.setattr(blocks, "TILE_BYTES", 16 * 1024)  # 16 rows of 512
    parts = [(random_blocks(12, 40, 512, 1), 12), (random_blocks(8, 24, 512, 2), 8), (random_blocks(14, 20, 512, 3), 14)]
    x = torch.randn(blocks.PREFILL_ROWS + 5, 512).bfloat16()
    y = blocks.linear(x, parts, torch.bfloat16)
    ref = x.double() @ torch.cat([blocks.dequantize(w, kind).bfloat16() for w, kind in parts]).double().T
    assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * ref.abs().max()).all()
    few = blocks.linear(x[:blocks.PREFILL_ROWS - 1], parts, torch.bfloat16)
    monkeypatch.setenv("MEDGEM_BLOCKS_PREFILL", "0")
    assert torch.equal(few, blocks.linear(x, parts, torch.bfloat16)[:len(few)])


@needs_blocks
def test_segments_of_different_types_in_one_call():
    """q, k and v of a Q4_K_M file may be Q4_K, Q4_K and Q6_K: one call, outputs side by side, bitwise
    what separate calls give."""
    parts = [(random_blocks(12, 32, 512, 1), 12), (random_blocks(12, 16, 512, 2), 12), (random_blocks(14, 16, 512, 3), 14)]
    x = torch.randn(5, 512).bfloat16()
    together = blocks.linear(x, parts, torch.bfloat16)
    assert torch.equal(together, torch.cat([blocks.linear(x, [p], torch.bfloat16) for p in parts], dim=1))


@needs_blocks
def test_out_of_bounds_inputs_are_refused():
    """The C code trusts pointers and sizes, so every mismatch is refused before it runs."""
    w = random_blocks(12, 16, 512)
    x = torch.randn(2, 512).bfloat16()
    bad = [
        (torch.randn(2, 256).bfloat16(), [(w, 12)]),  # rows of another width
        (x, [(w[:, :-1].contiguous(), 12)]),  # a row one byte short
        (x, [(w.view(torch.int8), 12)]),  # not bytes
        (x, [(w, 99)]),  # a type the kernel does not read
        (x, [(random_blocks(12, 16, 512)[:, ::2], 12)]),  # not contiguous
        (torch.randn(2, 1024).bfloat16()[:, ::2], [(w, 12)]),  # strided activations
        (x.half(), [(w, 12)]),  # float16 activations
        (x, []),
    ]
    for inputs, segments in bad:
        with pytest.raises(TypeError, match="block kernel"):
            blocks.linear(inputs, segments, torch.float32)
    assert blocks.row_bytes(12, 640) is None  # Q4_K needs whole 256-weight blocks
    assert blocks.linear(torch.empty(0, 512).bfloat16(), [(w, 12)], torch.float32).shape == (0, 16)


@needs_blocks
def test_layer_compiles_into_a_graph():
    layer = BlockLinear(random_blocks(8, 64, 128), 8, 128)
    x = torch.randn(3, 128).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("env", [{"MEDGEM_BLOCKS": "0"}, {"CC": "false"}], ids=["switched-off", "compiler-fails"])
def test_falls_back_to_pytorch_kernels(env, tmp_path):
    """Switched off, or where building fails (fresh cache, failing compiler), the model loads on PyTorch's
    kernels and says why, instead of failing."""
    code = ("import medgem, torch; from medgem.engine import blocks; pipe = medgem.load(quant='int4');"
            "pipe.model(torch.tensor([[2, 100]])); print(blocks.available(), type(pipe.model.layers[0].mlp.up_proj).__name__)")
    env = {**os.environ, "MEDGEM_CACHE": str(tmp_path), "MEDGEM_VNNI": "0", **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False" and out.stdout.split()[1] in ("Int4Linear", "Int8Linear")
    if "CC" in env and set(blocks.CPU_FLAGS) <= ckernel.cpu_flags():
        assert "blocks_avx2 off" in out.stderr and "compiling blocks_avx2.c failed" in out.stderr


@needs_blocks
def test_mapped_model_equals_one_with_its_blocks_in_memory(embedded_gguf):
    """The int4 model's weights are views of the file's memory map; the same blocks copied into memory
    give bitwise the same logits, and the map is shared by every layer (no copy was made)."""
    pipe = medgem.load(quant="int4")
    model = pipe.model
    layers = [m for m in model.modules() if isinstance(m, BlockLinear)]
    storages = {m.qweight.untyped_storage().data_ptr() for m in layers}
    assert len(storages) == 1  # one map of the whole file
    ids = torch.tensor([[2, 818, 6213, 563, 1164, 236761]])
    with torch.inference_mode():
        mapped = model(ids)
        for m in layers:
            m.qweight = m.qweight.clone()
        assert torch.equal(model(ids), mapped)


def test_truncated_file_is_a_clear_error(embedded_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(embedded_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(embedded_gguf.stat().st_size - 1_000_000))
    with pytest.raises(CheckpointError, match="truncated"):  # before a tokenizer or kernel is built for it
        _, tensors, _ = open_text_checkpoint(cut)
        BlockLinear(tensors["layers.0.mlp.up_proj.weight"].blocks(), 12, 640)
