"""Checkpoint tensors read on demand, a range of rows at a time.

Loaders quantize big matrices a slice of rows at a time through this, so loading never holds a dense
float32 copy of the whole model (the 270M's 262k x 640 embedding alone is 671 MB in fp32).
"""

from __future__ import annotations

import torch


class LazyRows:
    """One tensor of a checkpoint: `t[i:j]` reads rows i..j-1 (a vector is one row), `t.read()` all."""

    shape: tuple[int, ...]
    # Bits per weight as stored (a GGUF quant type's, blocks' scales included); None for dense floats.
    stored_bits: float | None = None

    def __getitem__(self, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        return self[0:self.shape[0]]

    def meta(self) -> torch.Tensor:
        """A shape-only stand-in, for checking names and shapes before anything is read."""
        return torch.empty(self.shape, device="meta")
