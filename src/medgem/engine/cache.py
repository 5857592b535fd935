"""KV cache for a static batch: global layers grow, sliding layers keep only their window.

Every slot carries its token's position (-1 when empty) and image-group id, so the model derives its
masks from positions and the slot order never matters. That is what lets a sliding layer be a ring
buffer of `window` slots: a prefill chunk attends over [old ring, new keys], then the newest `window`
keys overwrite the oldest slots; a decode step's single key is written first and attends over the ring.
"""

from __future__ import annotations

import torch

from medgem.config import SLIDING, TextConfig


class _Layer:
    __slots__ = ("k", "v", "pos", "groups", "filled")

    def __init__(self, batch: int, kv_heads: int, slots: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.groups = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.filled = 0  # slots written so far (global) / tokens seen so far (ring)


class KVCache:
    """Per-layer key/value storage for `batch` sequences of at most `max_len` tokens."""

    def __init__(
        self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"
    ):
        self.max_len = max_len
        self.window = cfg.sliding_window
        self.sliding = [t == SLIDING for t in cfg.layer_types]
        self.layers = [
            _Layer(
                batch, cfg.num_key_value_heads, min(self.window, max_len) if sliding else max_len,
                cfg.head_dim, dtype, device,
            )
            for sliding in self.sliding
        ]

    @staticmethod
    def bytes_needed(cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> int:
        """What `KVCache(cfg, batch, max_len, dtype)` allocates, without allocating it (budget checks)."""
        item = torch.empty((), dtype=dtype).element_size()
        per_slot = batch * (2 * cfg.num_key_value_heads * cfg.head_dim * item + 2 * 8)  # k, v; pos, groups
        return sum(per_slot * (min(cfg.sliding_window, max_len) if t == SLIDING else max_len) for t in cfg.layer_types)

    @property
    def length(self) -> int:
        """Tokens stored per sequence (padding included)."""
        return self.layers[0].filled

    def update(self, layer_idx: int, k, v, positions, groups):
        layer = self.layers[layer_idx]
        t = k.shape[2]
        if not self.sliding[layer_idx]:
            start, end = layer.filled, layer.filled + t
            if end > layer.k.shape[2]:
                raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {layer.k.shape[2]}")
            layer.k[:, :, start:end] = k
            layer.v[:, :, start:end] = v
            layer.pos[:, start:end] = positions
            layer.groups[:, start:end] = groups
            layer.filled = end
            return layer.k[:, :, :end], layer.v[:, :, :end], layer.pos[:, :end], layer.groups[:, :end]
        slots = layer.k.shape[2]
        if t == 1:
            # One new key: the one it evicts is `window` positions back, outside the new query's
            # window, so write first and attend over the ring alone (no copy of the ring per step).
            i = layer.filled % slots
            layer.k[:, :, i:i + 1] = k
            layer.v[:, :, i:i + 1] = v
            layer.pos[:, i:i + 1] = positions
            layer.groups[:, i:i + 1] = groups
            layer.filled += 1
            return layer.k, layer.v, layer.pos, layer.groups
        # Several new keys: attend over the old ring plus the new keys, then keep the newest `window`.
        keys = torch.cat((layer.k, k), dim=2)
        values = torch.cat((layer.v, v), dim=2)
        pos = torch.cat((layer.pos, positions), dim=1)
        grp = torch.cat((layer.groups, groups), dim=1)
        keep = min(t, slots)
        idx = (torch.arange(layer.filled + t - keep, layer.filled + t, device=k.device) % slots)
        layer.k[:, :, idx] = k[:, :, t - keep:]
        layer.v[:, :, idx] = v[:, :, t - keep:]
        layer.pos[:, idx] = positions[:, t - keep:]
        layer.groups[:, idx] = groups[:, t - keep:]
        layer.filled += t
        return keys, values, pos, grp
