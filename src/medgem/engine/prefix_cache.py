"""Prefix caching: a new request reuses the keys and values of the longest prompt prefix seen before.

A shared system prompt or a repeated image is then prefilled once. Prompts are cut into blocks of
`block` tokens. Block i is keyed by a hash chain over every token up to its end. Every soft token of an
image has the same id, so the pixels of each image that a block shows go into its key too. A key thus
names a whole prefix. A hit copies the blocks into the request's slot, and only the rest of the prompt
is prefilled. Blocks hold every layer, so a sliding layer gets its window back.

The store holds at most `max_bytes`. The least recently used block goes first. A lookup touches a
chain from its end back to its root, so a shared root outlives the branches that hang off it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from medgem.engine.slots import SlotCache

Block = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (k, v, groups) per layer


def block_keys(ids: list[int], groups: torch.Tensor, pixel_values: torch.Tensor | None, block: int) -> list[bytes]:
    """One key per full block of the prompt: a hash of every token (and image) up to the block's end.

    groups: [T] image-group ids (-1 for text); the n-th distinct group is the n-th image of pixel_values.
    """
    runs = list(dict.fromkeys(g for g in groups.tolist() if g >= 0))
    digests = {}
    if pixel_values is not None:
        for run, image in zip(runs, pixel_values):
            raw = image.detach().cpu().contiguous().view(torch.uint8).numpy()
            digests[run] = hashlib.blake2b(raw.tobytes(), digest_size=16).digest()
    keys, key = [], b""
    for start in range(0, len(ids) - block + 1, block):
        h = hashlib.blake2b(key, digest_size=16)
        h.update(np.asarray(ids[start:start + block], dtype=np.int64).tobytes())
        for run in dict.fromkeys(g for g in groups[start:start + block].tolist() if g >= 0):
            h.update(digests.get(run, b""))
        key = h.digest()
        keys.append(key)
    return keys


class PrefixCache:
    """KV blocks of earlier prompts, keyed by `block_keys`, within a byte budget."""

    def __init__(self, block: int = 64, max_bytes: int = 256 * 2**20):
        self.block, self.max_bytes = block, max_bytes
        self._blocks: OrderedDict[bytes, tuple[Block, int]] = OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache

    def match(self, keys: list[bytes]) -> int:
        """How many leading blocks of `keys` are stored."""
        n = 0
        while n < len(keys) and keys[n] in self._blocks:
            n += 1
        return n

    def load(self, cache: SlotCache, slot: int, keys: list[bytes]) -> int:
        """Copy the stored blocks `keys` (all present: see `match`) into an empty slot; tokens restored."""
        if not keys:
            return 0
        for key in reversed(keys):
            self._blocks.move_to_end(key)
        blocks = [self._blocks[key][0] for key in keys]
        layers = [
            tuple(torch.cat([b[i][j] for b in blocks], dim=-1 if j == 2 else 1) for j in range(3))
            for i in range(len(blocks[0]))
        ]
        cache.write(slot, layers)  # type: ignore[arg-type]
        restored = len(keys) * self.block
        self.hit_tokens += restored
        return restored

    def save(self, cache: SlotCache, slot: int, keys: list[bytes], before: int, now: int) -> None:
        """Store the blocks of `keys` that end within prompt tokens (before, now], just computed in `slot`."""
        first, last = before // self.block, min(now // self.block, len(keys))
        for b in range(first, last):
            if keys[b] in self._blocks:
                continue
            data = cache.read(slot, b * self.block, (b + 1) * self.block)
            size = sum(t.numel() * t.element_size() for layer in data for t in layer)
            if size > self.max_bytes:
                return
            self._blocks[keys[b]] = (data, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._blocks.popitem(last=False)
                self.bytes -= dropped
        for key in reversed(keys[:last]):
            if key in self._blocks:
                self._blocks.move_to_end(key)
