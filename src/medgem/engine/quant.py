"""Weight-only quantization for CPU decoding: int8 per-channel and int4 group-wise.

Decode reads every weight once per token, so fewer bytes per weight is more tokens per second. The
matmuls are PyTorch's own CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which
are fast only with bf16 activations, so a quantized model runs its activations in bf16.

The tied embedding / LM head (168M of the 270M model's parameters) is quantized too: int8 rows serve
both the LM head matmul and the embedding lookup (one copy). With int4, the head uses int4 and the
embedding lookup keeps int8 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgem.errors import InputError

QUANT_MODES = ("none", "int8", "int4")
ACT_DTYPE = torch.bfloat16


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (output channel) int8: weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(ACT_DTYPE)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with int8 weights; activations in bf16."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = int8_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale)
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 (groups along the input dimension), packed for the CPU kernel."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        super().__init__()
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise InputError(f"int4 group size {group_size} does not divide in_features {in_f}")
        w = weight.float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(ACT_DTYPE))
        self.group_size, self.out_features, self.in_features = group_size, out_f, in_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    """Scaled Gemma embedding lookup from int8 rows (shared with an Int8Linear LM head when tied)."""

    def __init__(self, table: Int8Linear, scale: float):
        super().__init__()
        self.table = table
        self.embed_scale = scale
        self.embedding_dim = table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.table.qweight).to(ACT_DTYPE) * self.table.scales[ids][..., None]
        return rows * torch.tensor(self.embed_scale, dtype=ACT_DTYPE)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the embedding matrix (dtype/device probes)
        return self.table.scales


def _quantized(linear: nn.Linear, mode: str, group_size: int) -> nn.Module:
    if mode == "int8":
        return Int8Linear(linear.weight.data)
    return Int4Linear(linear.weight.data, group_size)


def quantize_text_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Replace every decoder linear and the tied embedding/LM head in place; the rest goes to bf16."""
    if mode not in QUANT_MODES:
        raise InputError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return model
    model.to(ACT_DTYPE)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized(child, mode, group_size))
    embedding = model.embed_tokens
    table = Int8Linear(embedding.weight.data)
    scale = embedding.embedding_dim**0.5
    head_source = model.lm_head
    model.embed_tokens = Int8Embedding(table, scale)
    if mode == "int8" and model.config.tie_word_embeddings:
        model.lm_head = table
    else:
        model.lm_head = _quantized(head_source, mode, group_size)
    model.quantization = mode
    return model


@torch.inference_mode()
def greedy_agreement(model: nn.Module, sequences: list[list[int]], prompt_lens: list[int]) -> float:
    """Share of a reference's greedy tokens that `model` also picks when fed the same prefix.

    Teacher-forced, so one early disagreement does not turn every later token into a mismatch the
    way comparing two free-running generations does.
    """
    agree = total = 0
    for seq, start in zip(sequences, prompt_lens, strict=True):
        if len(seq) <= start:
            continue
        logits = model(torch.tensor([seq]))[0, start - 1:-1]
        agree += int((logits.argmax(-1) == torch.tensor(seq[start:])).sum())
        total += len(seq) - start
    return agree / max(total, 1)
