"""A KV cache of independent slots, one sequence per slot, and a model bound to it.

Continuous batching needs rows that start, grow and end on their own. Masks come from token
positions (nn/text.py), so rows need not be aligned: each slot keeps its own length, and a step may
feed one token to some rows, a prefill chunk to one row, or nothing to a row (position -1).

Storage per layer is [slots, kv_heads, 1 + size, head_dim]. Column 0 is a scratch column that only
ever holds position -1: padding tokens write there, and it gives padding queries a key to attend, so
no softmax row is empty. A token that is the n-th of its sequence lives in column 1 + n % size.
Global layers have size = capacity, so that is a plain append. Sliding layers have size =
window + slack - 1, a ring. Keys are written *before* attention. A step of up to `slack` tokens then
evicts only keys that lie outside every new query's window. That keeps the ring exact for prefill
chunks and for speculative verification, which both feed at most `slack` tokens a step, and it lets
`truncate` undo up to `slack` tokens.
"""

from __future__ import annotations

import torch

from medgem.config import SLIDING, TextConfig


class SlotCache:
    """KV storage for `slots` sequences of at most `capacity` tokens each."""

    def __init__(self, cfg: TextConfig, slots: int, capacity: int, slack: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.capacity, self.slack = capacity, slack
        ring = cfg.sliding_window + slack - 1
        self.sizes = [min(ring, capacity) if t == SLIDING else capacity for t in cfg.layer_types]
        shape = (slots, cfg.num_key_value_heads)
        self.k = [torch.zeros(*shape, 1 + s, cfg.head_dim, dtype=dtype, device=device) for s in self.sizes]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos = [torch.full((slots, 1 + s), -1, dtype=torch.long, device=device) for s in self.sizes]
        self.groups = [torch.full((slots, 1 + s), -1, dtype=torch.long, device=device) for s in self.sizes]
        self.lengths = [0] * slots  # tokens stored per slot (padding not counted)
        self.device = torch.device(device)

    def view(self, rows: slice, positions: torch.Tensor) -> _StepView:
        """The cache as seen by one forward over slots `rows` with token positions [B, T] (-1 = padding).

        Reserves the columns for the real tokens now, so every layer writes to the same place.
        """
        if rows.stop - rows.start != positions.shape[0]:
            raise ValueError(f"positions have {positions.shape[0]} rows for slots {rows.start}..{rows.stop - 1}")
        valid = (positions >= 0).cpu()
        counts = valid.sum(1).tolist()
        if max(counts, default=0) > self.slack:
            raise ValueError(f"a step feeds {max(counts)} tokens to one slot; this cache allows {self.slack}")
        starts = torch.tensor(self.lengths[rows], dtype=torch.long)[:, None]
        n = starts + valid.cumsum(1) - 1  # index of each token within its sequence
        for i, c in zip(range(rows.start, rows.stop), counts):
            self.lengths[i] += c
        longest = max(self.lengths[rows])
        if longest > self.capacity:
            raise ValueError(f"a slot would hold {longest} tokens; capacity is {self.capacity}")
        columns = {s: torch.where(valid, 1 + n % s, 0).to(self.device) for s in set(self.sizes)}
        return _StepView(self, rows, columns, longest)

    def truncate(self, slot: int, length: int) -> None:
        """Forget the tokens of `slot` past `length` (rejected speculative tokens); at most `slack` of them."""
        dropped = self.lengths[slot] - length
        if dropped > self.slack:
            raise ValueError(f"cannot roll back {dropped} tokens; this cache keeps {self.slack}")
        n = torch.arange(length, self.lengths[slot], device=self.device)
        for pos, size in zip(self.pos, self.sizes):
            pos[slot, 1 + n % size] = -1
        self.lengths[slot] = length

    def free(self, slot: int) -> None:
        """Empty a slot for the next request (stale positions would otherwise be attended)."""
        for pos, groups in zip(self.pos, self.groups):
            pos[slot].fill_(-1)
            groups[slot].fill_(-1)
        self.lengths[slot] = 0

    def read(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Copies of (k, v, groups) of tokens [start, end) of `slot` in every layer (for the prefix cache).

        The tokens must still be held: a ring keeps only the newest `size` tokens of a sequence.
        """
        if self.lengths[slot] - start > min(self.sizes) or end > self.lengths[slot]:
            raise ValueError(f"tokens {start}..{end} of slot {slot} are no longer (or not yet) in the cache")
        n = torch.arange(start, end, device=self.device)
        out = []
        for k, v, groups, size in zip(self.k, self.v, self.groups, self.sizes):
            cols = 1 + n % size
            out.append((k[slot][:, cols], v[slot][:, cols], groups[slot][cols]))  # indexing copies
        return out

    def write(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Fill an empty slot with the (k, v, groups) of tokens 0..n-1 in every layer (a prefix-cache hit)."""
        length = layers[0][0].shape[1]
        for i, (k, v, groups) in enumerate(layers):
            keep = min(length, self.sizes[i])  # a ring takes the newest tokens only
            cols = 1 + torch.arange(length - keep, length, device=self.device) % self.sizes[i]
            self.k[i][slot][:, cols] = k[:, length - keep:].to(self.k[i].dtype)
            self.v[i][slot][:, cols] = v[:, length - keep:].to(self.v[i].dtype)
            self.groups[i][slot, cols] = groups[length - keep:]
            self.pos[i][slot, cols] = torch.arange(length - keep, length, device=self.device)
        self.lengths[slot] = length


class _StepView:
    """What nn/text.py calls during one forward: writes the new keys, returns the slots' keys."""

    def __init__(self, cache: SlotCache, rows: slice, columns: dict[int, torch.Tensor], longest: int):
        self.cache, self.rows, self.columns, self.longest = cache, rows, columns, longest
        b = rows.stop - rows.start
        self.batch = torch.arange(b, device=cache.device)[:, None]

    def update(self, layer_idx: int, k, v, positions, groups):
        c, rows = self.cache, self.rows
        size = c.sizes[layer_idx]
        cols = self.columns[size]
        keys, values, pos, grp = c.k[layer_idx][rows], c.v[layer_idx][rows], c.pos[layer_idx][rows], c.groups[layer_idx][rows]
        keys[self.batch, :, cols] = k.transpose(1, 2)
        values[self.batch, :, cols] = v.transpose(1, 2)
        pos[self.batch, cols] = positions
        grp[self.batch, cols] = groups
        end = 1 + min(size, self.longest)
        return keys[:, :, :end], values[:, :, :end], pos[:, :end], grp[:, :end]


class SlotModel:
    """A model (nn/text.py forward signature) bound to its SlotCache: what the scheduler and drafter run."""

    def __init__(self, model: torch.nn.Module, cfg: TextConfig, slots: int, capacity: int, slack: int):
        self.model, self.config = model, cfg
        param = next(model.parameters())
        self.device = param.device
        self.cache = SlotCache(cfg, slots, capacity, slack, dtype=activation_dtype(model), device=param.device)
        # The LM head runs only on the rows whose logits are wanted, not on padding rows.
        self._head = getattr(model, "language_model", model).logits

    def hidden(self, rows: slice, positions: torch.Tensor, *, ids: torch.Tensor | None = None,
               embeds: torch.Tensor | None = None, groups: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Final hidden states [B, T or 1, hidden] of one forward over slots `rows`."""
        positions = positions.to(self.device)
        view = self.cache.view(rows, positions)
        groups = torch.full_like(positions, -1) if groups is None else groups.to(self.device)
        kwargs = dict(positions=positions, groups=groups, cache=view, last_only=last_only, return_hidden=True)
        if embeds is not None:
            return self.model(inputs_embeds=embeds.to(self.device), **kwargs)
        return self.model(ids.to(self.device), **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V] (on the CPU, where sampling runs)."""
        return self._head(hidden).float().cpu()


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The activation dtype: the first floating parameter (quantized models also hold integer tensors)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32
