"""The Gemma 3 decoder, read top to bottom like the paper.

Gemma 3 is a decoder-only transformer with: sandwich RMSNorms scaled by (1 + w); GQA attention with
RMSNorm on queries and keys before RoPE; five sliding-window layers to one global layer, each type with
its own RoPE base (linear scaling on global layers only); a GeGLU MLP with tanh-GELU; embeddings
scaled by sqrt(hidden); a tied LM head; optional tanh soft-capping of attention and final logits.

Attention masks are derived from token *positions* (and image-group ids), never from slot order, so
the same code serves a full forward, a padded batch, and a ring-buffer KV cache. A cache is any object
with `update(layer_idx, k, v, positions, groups) -> (k, v, positions, groups)` (see engine/cache.py);
this module imports nothing above nn/.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from medgem.config import SLIDING, TextConfig
from medgem.nn import Embedding


class KVCache(Protocol):
    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and scaled by (1 + w): Gemma stores w as an offset from one."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ATen's fused op, bit-identical to x * rsqrt(mean(x^2) + eps) * (1 + w) written out, and a third
        # faster eagerly: a token runs 109 of these.
        return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).type_as(x)


def rope_inv_freq(head_dim: int, base: float, linear_factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings; linear scaling divides them (stretches positions)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv / linear_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [B, 1, T, head_dim] for integer positions [B, T], computed in fp32 and
    cast to the activations' dtype once a forward rather than in each layer. The first half of the sin
    is negated, which lets `apply_rope` rotate with a single roll."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of x [B, H, T, D] (the non-interleaved layout Gemma checkpoints use):
    x * cos + [-x2, x1] * sin, written as a roll times the sign-folded sin (4 ops a call instead of 11;
    a decode step makes 36 calls)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_groups: torch.Tensor, k_groups: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: True where a query may attend a key.

    Causal by position, or both ways between tokens of one image (same group id >= 0); a sliding layer
    then also requires q - k < window. Keys at position -1 are padding or empty cache slots; padding
    queries (position -1) see only those, so their rows are never empty (no NaN), and are discarded.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp <= qp) & ((kp >= 0) | (qp < 0))
    qg, kg = q_groups[:, :, None], k_groups[:, None, :]
    allowed |= (qg == kg) & (qg >= 0)
    if window is not None:  # the window bounds image tokens too, as in Gemma's reference
        allowed &= (qp - kp) < window
    return allowed[:, None]


def project(x: torch.Tensor, parts: tuple[nn.Module, ...], fused) -> tuple[torch.Tensor, ...]:
    """Each of `parts` applied to x: in one matmul when the engine stacked exactly these weights
    (engine/quant.py, `fuse_projections`); one call each once anything replaced a part (LoRA)."""
    if fused is not None and fused.parts == parts:
        return fused(x)
    return tuple(part(x) for part in parts)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.sliding_window if cfg.layer_types[layer_idx] == SLIDING else None
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.fused = None  # q, k and v as one matmul (engine/quant.py); not a submodule

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        groups: torch.Tensor,
        cache: KVCache | None,
        masks: dict,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.fused)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        k_pos, k_groups = positions, groups
        if cache is not None:
            k, v, k_pos, k_groups = cache.update(self.layer_idx, k, v, positions, groups)
        # Every layer of one type sees the same key positions, so its mask is built once per forward.
        mask = masks.get(self.window)
        if mask is None or mask.shape[-1] != k_pos.shape[-1]:
            mask = masks[self.window] = attention_mask(positions, k_pos, groups, k_groups, self.window)
        if self.softcap is None and t == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
            out = self._decode_attention(q, k, v, mask)
        elif self.softcap is None:
            # CPU SDPA in bf16 is ~10x slower than in fp32 past a few hundred keys; compute it in fp32.
            upcast = q.device.type == "cpu" and q.dtype != torch.float32
            qf, kf, vf = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
            out = F.scaled_dot_product_attention(
                qf, kf, vf, attn_mask=mask, scale=self.scale, enable_gqa=self.n_heads != self.n_kv
            ).to(q.dtype)
        else:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-1, -2)).float() * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _decode_attention(self, q, k, v, mask):
        """One query per sequence, every head of a KV group in one matmul, in fp32: compiled, 7 % faster
        decoding than SDPA (inductor fuses the masking and softmax); eagerly, SDPA's one call wins."""
        b, _, t, d = q.shape
        rep = self.n_heads // self.n_kv
        qf = q.float().reshape(b, self.n_kv, rep * t, d)
        scores = (qf @ k.float().transpose(-1, -2)) * self.scale
        scores = scores.view(b, self.n_kv, rep, t, -1).masked_fill(~mask[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(b, self.n_kv, rep * t, -1)
        return (probs @ v.float()).view(b, self.n_heads, t, d).to(q.dtype)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.fused = None  # gate and up as one matmul (engine/quant.py); not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), self.fused)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    """Sandwich norms around both sub-blocks, then the residual."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.is_sliding = cfg.layer_types[layer_idx] == SLIDING
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos_sin, positions, groups, cache, masks):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos_sin, positions, groups, cache, masks)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class ScaledEmbedding(Embedding):
    """Token embeddings times sqrt(hidden), the scale rounded to the weight dtype as Gemma does."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out * torch.tensor(math.sqrt(self.embedding_dim), dtype=out.dtype)


class Gemma3Text(nn.Module):
    """Gemma 3 causal LM: `model(input_ids)` -> logits [B, T, V] (fp32).

    Parameter names match transformers' `Gemma3ForCausalLM` minus the `model.` prefix, so state dicts
    map one to one (weights/hf.py handles the prefixes of every published layout).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq_local", torch.empty(0), persistent=False)
        self.register_buffer("inv_freq_global", torch.empty(0), persistent=False)
        self.finish_init()

    def finish_init(self) -> None:
        """Tie the LM head and compute RoPE tables; call again after loading weights with assign=True."""
        cfg = self.config
        if cfg.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # quantized heads share rows already
            self.lm_head.weight = self.embed_tokens.weight
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            return  # built empty for loading; the loader calls finish_init again with real weights
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_base_freq).to(device)
        self.inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor).to(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only).

        positions: [B, T] absolute positions, -1 for padding (default 0..T-1).
        groups: [B, T] image-group ids for bidirectional attention within an image, -1 for text.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        if groups is None:
            groups = torch.full((b, t), -1, dtype=torch.long, device=x.device)
        x = self.decoder(x, positions, groups, cache)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return x
        return self.logits(x)

    def decoder(self, x: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        """Embeddings -> final-normed hidden states: every layer, nothing of the vocabulary. It is what
        `Pipeline.compile` compiles; the embedding lookup and the LM head stay outside."""
        rope_pos = positions.clamp(min=0)
        local = rope_cos_sin(rope_pos, self.inv_freq_local, x.dtype)
        global_ = rope_cos_sin(rope_pos, self.inv_freq_global, x.dtype)
        masks: dict = {}
        for layer in self.layers:
            x = layer(x, local if layer.is_sliding else global_, positions, groups, cache, masks)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
