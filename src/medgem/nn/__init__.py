"""Model code (ours; transformers is only a test-time reference) and the pieces its modules share."""

from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding whose random init is skipped on the meta device, where the loaders build models.

    `normal_` on a meta tensor runs through torch._refs, which imports torch._dynamo: 70 MB of RSS and
    about a second of loading, for values that the checkpoint's replace anyway.
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
