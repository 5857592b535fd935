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
    # Weights per group where the file stores 4-bit codes an int4 kernel can take as they are (GGUF Q4_0,
    # Q4_1, Q4_K); such a reader has `int4_rows(start, stop) -> (codes, scale, low)`. None otherwise.
    int4_group: int | None = None

    def __getitem__(self, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        return self[0:self.shape[0]]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows `ids` (any shape of row numbers), each distinct row read once: an embedding lookup
        that leaves the table in the checkpoint file."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)  # sorted
        if len(unique) and (unique[0] < 0 or unique[-1] >= self.shape[0]):
            bad = int(unique[0] if unique[0] < 0 else unique[-1])
            raise IndexError(f"row {bad} is out of range: this table has rows 0..{self.shape[0] - 1}")
        rows = self._rows(unique.tolist()) if len(unique) else torch.empty(0, *self.shape[1:])
        return rows[inverse].reshape(*ids.shape, *self.shape[1:])

    def hold(self) -> None:
        """Keep the file open for later `gather`s, so a file replaced or deleted after loading cannot
        change or break a loaded model (readers that read by path override this)."""

    def _rows(self, numbers: list[int]) -> torch.Tensor:
        """Float32 rows by number, in that order, read from the held file."""
        raise NotImplementedError

    def meta(self) -> torch.Tensor:
        """A shape-only stand-in, for checking names and shapes before anything is read."""
        return torch.empty(self.shape, device="meta")
