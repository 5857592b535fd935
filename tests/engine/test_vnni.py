"""The AVX-512 VNNI int8 kernel (engine/vnni.py): its integer arithmetic, its independence of the
batch, and the fallback to PyTorch's kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from medgem.engine import ckernel, vnni
from medgem.engine.quant import Int8Linear, int8_rows

needs_vnni = pytest.mark.skipif(not vnni.available(), reason="this CPU has no AVX-512 VNNI (or no C compiler)")


def spelled_out(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: activations rounded to int8 in blocks of 32 (in float32, as the
    kernel rounds them), exact integer sums, the scales applied in float64."""
    blocks = x.float().reshape(x.shape[0], -1, vnni.BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # tensor / tensor: rounded as C does
    codes = torch.round(blocks * inverse).to(torch.int64)
    sums = torch.einsum("mbk,nbk->mnb", codes, q.to(torch.int64).reshape(q.shape[0], -1, vnni.BLOCK))
    step = (amax / 127).squeeze(-1).double()
    return (sums.double() * step[:, None, :]).sum(-1) * scales.double()


def test_pack_round_trips():
    q = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    panels = vnni.pack(q)
    assert panels.shape == (3, 24, 16, 4) and panels.dtype == torch.uint8
    assert torch.equal(vnni.unpack(panels), q)


@needs_vnni
def test_kernel_is_the_block_rounded_integer_matmul():
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    x = (torch.randn(6, 256) * torch.linspace(0.01, 50, 256)).bfloat16()  # blocks of very different size
    q, scales = int8_rows(weight)
    panels = vnni.pack(q)
    expected = spelled_out(x, q, scales)
    logits = vnni.linear(x, panels, scales, torch.float32)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)
    hidden = vnni.linear(x, panels, scales, torch.bfloat16)
    assert torch.equal(hidden, logits.bfloat16())  # the bf16 output is the float32 one, rounded
    dense = x.float() @ weight.T
    assert ((logits - dense).norm() / dense.norm()).item() < 0.01
    for bad in (x.float(), x[:, :128].contiguous(), x.T.contiguous().T):  # the C code would read out of bounds
        with pytest.raises(TypeError, match="int8 VNNI kernel"):
            vnni.linear(bad, panels, scales, torch.float32)


@needs_vnni
def test_rows_do_not_depend_on_their_batch():
    """Rows go through the kernel eight, four and then one at a time; each must come out the same
    alone as anywhere in a batch, or batched decoding would change greedy text."""
    torch.manual_seed(1)
    layer = Int8Linear(torch.randn(160, 640))
    assert layer.vnni
    x = torch.randn(13, 640).bfloat16()  # through the 8-, 4- and 1-row paths
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1])
    assert torch.equal(layer(x[3:12]), batched[3:12])
    assert layer(x[:0]).shape == (0, 160)  # no rows, no call into the kernel


@needs_vnni
def test_layer_keeps_one_copy_and_gives_back_its_weights():
    torch.manual_seed(2)
    weight = torch.randn(64, 96)
    layer = Int8Linear(weight)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == weight.numel()
    assert ((layer.dequantized() - weight).abs().max() / weight.abs().max()).item() < 0.01
    odd = Int8Linear(torch.randn(40, 96))  # 40 rows: not whole panels of 16, so PyTorch's kernel
    assert not odd.vnni and odd.qweight.dtype == torch.int8


@needs_vnni
def test_model_mixing_kernels_runs_unfused():
    """k/v of 8 rows do not fill a 16-row panel and stay on another kernel (the block kernel, or
    PyTorch's) while q uses VNNI:
    such parts are not stacked into one matmul, and the model still matches its dense self."""
    from medgem.config import tiny_text_config
    from medgem.engine.quant import quantize_text_model
    from medgem.nn.text import Gemma3Text

    torch.manual_seed(5)
    dense = Gemma3Text(tiny_text_config(num_key_value_heads=1, head_dim=8)).eval()
    ids = torch.tensor([[3, 17, 99, 4, 250, 8]])
    with torch.inference_mode():
        expected = dense(ids)
        model = quantize_text_model(dense, "int8")
        attn = model.layers[0].self_attn
        assert attn.q_proj.vnni and not getattr(attn.k_proj, "vnni", False) and attn.fused is None
        logits = model(ids)
    assert ((logits - expected).norm() / expected.norm()).item() < 0.05


@needs_vnni
def test_kernel_compiles_into_a_graph():
    torch.manual_seed(3)
    layer = Int8Linear(torch.randn(64, 128))
    x = torch.randn(3, 128).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("env", [{"MEDGEM_VNNI": "0"}, {"CC": "false"}], ids=["switched-off", "compiler-fails"])
def test_falls_back_to_pytorch_kernel(env, tmp_path):
    """Switched off, or where building the kernel fails (a fresh cache and a compiler that fails),
    int8 layers run PyTorch's kernel and say why, instead of failing."""
    code = ("from medgem.engine import vnni, quant; import torch; layer = quant.Int8Linear(torch.randn(64, 64));"
            "layer(torch.randn(2, 64)); print(vnni.available(), layer.vnni)")
    env = {**os.environ, "MEDGEM_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    if "CC" in env and set(vnni.CPU_FLAGS) <= ckernel.cpu_flags():
        assert "int8_vnni off" in out.stderr and "compiling int8_vnni.c failed" in out.stderr
