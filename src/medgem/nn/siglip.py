"""SigLIP dual encoder (MedSigLIP): an image tower and a text tower meeting in one embedding space.

The image tower is the SigLIP ViT of nn/vision.py plus a multi-head attention-pooling ("MAP") head:
one learned probe vector attends over all patch states, then a residual LayerNorm + MLP, giving one
vector per image. The text tower embeds up to `max_position_embeddings` tokens (64 for MedSigLIP),
runs the same pre-LN encoder layers without a causal mask, and projects the *last* position's state
(texts are always padded to full length, as in training) through a linear head.

Both embeddings are L2-normalised; the score of a pair is cos(image, text) * exp(logit_scale) +
logit_bias, and training uses the sigmoid loss: every (image, text) pair of a batch is an
independent binary problem, positive on the diagonal, negative elsewhere (Zhai et al., 2023).

Parameter names match transformers' `SiglipModel` (`vision_model.head.probe`,
`text_model.embeddings.token_embedding`, `logit_scale`), so state dicts map one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medgem.config import VisionConfig
from medgem.errors import ConfigError, InputError
from medgem.nn import Embedding
from medgem.nn.vision import MLP, Encoder, SiglipVisionTower


@dataclass
class SiglipTextConfig:
    """The text tower. Field names and defaults follow transformers' `SiglipTextConfig`."""

    vocab_size: int = 32_000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    projection_size: int | None = None  # None: hidden_size
    layer_norm_eps: float = 1e-6
    pad_token_id: int = 1
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        if self.projection_size is None:
            self.projection_size = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}"
            )


@dataclass
class SiglipConfig:
    """Both towers. The text head must project to the image embedding width, or scores are undefined."""

    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(vision_use_head=True))

    def __post_init__(self) -> None:
        if self.text.projection_size != self.vision.hidden_size:
            raise ConfigError(
                f"text projection_size={self.text.projection_size} differs from the image embedding width "
                f"{self.vision.hidden_size}: the towers cannot be compared"
            )
        if not self.vision.vision_use_head:
            raise ConfigError("a SigLIP dual encoder needs the vision attention-pooling head (vision_use_head)")

    @property
    def embed_dim(self) -> int:
        return self.vision.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# MedSigLIP-448 (google/medsiglip-448): So400m towers, 448 px, 64 text tokens, 32k SentencePiece vocabulary.
MEDSIGLIP_448 = SiglipConfig(
    text=SiglipTextConfig(
        vocab_size=32_000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        max_position_embeddings=64,
    ),
    vision=VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=448,
        patch_size=14, vision_use_head=True,
    ),
)


class AttentionPoolingHead(nn.Module):
    """MAP head: a learned probe attends over the patch states, then x + mlp(ln(x)) -> [N, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(states.shape[0], -1, -1)
        pooled = self.attention(probe, states, states, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionModel(SiglipVisionTower):
    """The ViT of nn/vision.py with the attention-pooling head: pixels [N, 3, S, S] -> [N, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.head = AttentionPoolingHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(pixel_values))


class TextEmbeddings(nn.Module):
    """Token vectors plus one learned vector per position."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SiglipTextModel(nn.Module):
    """Token ids [N, T] -> [N, projection]: encoder, final LayerNorm, head on the last position."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise InputError(
                f"input_ids must be [N, <= {self.config.max_position_embeddings}], got {tuple(input_ids.shape)}"
            )
        states = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        return self.head(states[:, -1])


class SiglipModel(nn.Module):
    """Both towers plus the learned temperature and bias of the pairwise sigmoid."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.text_model = SiglipTextModel(cfg.text)
        self.vision_model = SiglipVisionModel(cfg.vision)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings [N, D]."""
        return F.normalize(self.vision_model(pixel_values), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings [N, D]."""
        return F.normalize(self.text_model(input_ids), dim=-1)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Pair scores [images, texts] from unit embeddings: cos * exp(scale) + bias."""
        return image_embeds @ text_embeds.T * self.logit_scale.exp() + self.logit_bias

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image [images, texts]; sigmoid of one entry is P(text matches image)."""
        return self.logits(self.embed_images(pixel_values), self.embed_texts(input_ids))


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss for a batch of matched pairs: logits [B, B] with the true pairs on the diagonal.

    Each entry is a binary problem, label +1 on the diagonal and -1 elsewhere; the loss is
    -sum(log sigmoid(label * logit)) over a row, averaged over rows (as in big_vision).
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise InputError(f"the sigmoid loss needs a square [B, B] logit matrix, got {tuple(logits.shape)}")
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(dim=-1).mean()
