"""The SigLIP vision transformer (So400m in MedGemma and MedSigLIP), read top to bottom.

An image is cut into patch_size x patch_size patches by a strided convolution, each patch gets a
learned position embedding, then pre-LayerNorm encoder layers (biased attention projections, a
tanh-GELU MLP) run over all patches with full bidirectional attention, and a final LayerNorm closes.
There is no class token: MedGemma pools the patch grid itself (nn/medgemma.py), MedSigLIP adds an
attention-pooling head (nn/siglip.py).

Parameter names match transformers' `SiglipVisionModel` (`embeddings.patch_embedding`,
`encoder.layers.N.self_attn.q_proj`, `post_layernorm`), so state dicts map one to one.
`EncoderLayer` and `Encoder` take plain sizes rather than a VisionConfig so SigLIP's text tower can
reuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgem.config import VisionConfig
from medgem.errors import InputError
from medgem.nn import Embedding


class VisionEmbeddings(nn.Module):
    """Patches -> vectors: conv with stride = kernel = patch size, plus one learned vector per position."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] pixels -> [N, patches, hidden], patches in row-major grid order."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise InputError(
                f"pixel_values must be [N, 3, {self.image_size}, {self.image_size}], got {tuple(pixel_values.shape)}"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class SelfAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections and the 1/sqrt(head_dim) scale."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden]; mask: optional boolean [B, 1, T, T] (True = may attend), or None for full."""
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float = 1e-6):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SelfAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s (named `encoder.layers.N` as in transformers)."""

    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, eps: float = 1e-6):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SiglipVisionTower(nn.Module):
    """SigLIP ViT without a pooling head: `tower(pixel_values)` -> last hidden state [N, patches, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps
        )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
