"""GGUF 4-bit tensors read as their own codes (weights/gguf_reader.py `int4_codes`): for each 4-bit type an
int4 kernel can take, code * scale + low is exactly what gguf's own dequantizer gives."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from medgem.errors import CheckpointError
from medgem.weights import open_text_checkpoint
from medgem.weights.gguf_reader import INT4_GROUP, int4_codes


def rebuilt(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    rows = codes.shape[0]
    groups = codes.float().reshape(rows, -1, INT4_GROUP)
    return (groups * scale[..., None] + low[..., None]).reshape(rows, -1)


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1])
def test_q4_0_and_q4_1_codes_rebuild_the_tensor_exactly(kind):
    weights = np.random.default_rng(0).normal(size=(6, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, kind)
    codes, scale, low = int4_codes(raw, kind)
    assert codes.shape == (6, 256) and scale.shape == low.shape == (6, 8) and int(codes.max()) <= 15
    assert torch.equal(rebuilt(codes, scale, low), torch.from_numpy(gguf.quants.dequantize(raw, kind)))


def test_q4_k_codes_of_the_real_model_rebuild_its_rows_exactly(embedded_gguf):
    _, tensors, _ = open_text_checkpoint(embedded_gguf)
    rows = tensors["layers.2.mlp.down_proj.weight"]  # Q4_K in this file (layers 0 and 1 have Q6_K)
    assert rows.int4_group == INT4_GROUP
    codes, scale, low = rows.int4_rows(100, 164)
    assert torch.equal(rebuilt(codes, scale, low), rows[100:164])


def test_other_types_are_refused():
    raw = gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(CheckpointError, match="Q8_0 is not stored in 4-bit groups"):
        int4_codes(raw, gguf.GGMLQuantizationType.Q8_0)
