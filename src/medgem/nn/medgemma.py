"""Multimodal MedGemma / Gemma 3: SigLIP tower -> projector -> soft tokens inside the Gemma 3 decoder.

1. The vision tower turns each 896 px image into a 64x64 grid of patch features.
2. The projector average-pools that grid to 16x16 (`mm_tokens_per_image` = 256), normalises each
   vector with Gemma's RMSNorm (1 + w) and maps it linearly to the text hidden size.
3. The prompt holds one `<image_soft_token>` per pooled vector; their embeddings are replaced by the
   projected features (unscaled: only real tokens get the sqrt(hidden) embedding scale).
4. The decoder attends causally, and the soft tokens of one image also see each other both ways.
   That is expressed with image-group ids (see nn/text.py `attention_mask`): each contiguous run of
   soft tokens is one group, named by the column where the run starts.

Parameter names match transformers' `Gemma3ForConditionalGeneration` with its prefixes normalised
(`language_model.*`, `vision_tower.*`, `multi_modal_projector.*`); weights/multimodal.py maps every
published layout onto them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medgem.config import MultimodalConfig, TextConfig
from medgem.errors import InputError
from medgem.nn.text import Gemma3Text, KVCache, RMSNorm
from medgem.nn.vision import SiglipVisionTower


class MultiModalProjector(nn.Module):
    """Patch grid -> average pool -> RMSNorm -> linear, giving `mm_tokens_per_image` text-sized vectors.

    The projection is a bare [vision_hidden, text_hidden] matrix (x @ W), stored that way by every
    published checkpoint and by llama.cpp's mmproj files.
    """

    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        vision, text = cfg.vision, cfg.text
        self.patches_per_side = vision.patches_per_side
        self.kernel = vision.patches_per_side // cfg.tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, text.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, vision.layer_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, patches, vision_hidden] -> [N, mm_tokens_per_image, text_hidden]."""
        n, _, hidden = features.shape
        side = self.patches_per_side
        grid = features.transpose(1, 2).reshape(n, hidden, side, side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(features)


def image_groups(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] group ids: each contiguous run of image soft tokens is one group, named by the column
    where the run starts; -1 for every other token. Ids are unique within one call (one prompt)."""
    is_image = input_ids == image_token_id
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    run_start = torch.cummax(torch.where(starts, columns, -1), dim=1).values
    return torch.where(is_image, run_start, -1)


VISION_BATCH = 8  # images through the vision tower at once (Gemma3Multimodal.encode_images)


class Gemma3Multimodal(nn.Module):
    """`model(input_ids, pixel_values)` -> logits [B, T, V] (fp32), like `Gemma3ForConditionalGeneration`.

    The engine calls `prepare_embeds` once per prompt (images encoded once), then the forward with
    `inputs_embeds` in prefill chunks and with `input_ids` while decoding, exactly as for Gemma3Text.
    """

    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        self.config = cfg
        self.language_model = Gemma3Text(cfg.text)
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)

    @property
    def text_config(self) -> TextConfig:
        return self.config.text

    def finish_init(self) -> None:
        self.language_model.finish_init()

    def encode_images(self, pixel_values: torch.Tensor,
                      on_image: Callable[[], None] | None = None) -> torch.Tensor:
        """[N, 3, H, W] normalised pixels -> [N, mm_tokens_per_image, text_hidden] soft-token embeddings,
        VISION_BATCH images at a time: an 85-slice CT in one batch would hold 85 x ~180 MB of So400m
        activations in float32 at once; images never attend to each other, so the result is the same.
        `on_image` is called once per encoded image (a progress line's tick)."""
        parts = []
        for chunk in pixel_values.split(VISION_BATCH):
            parts.append(self.multi_modal_projector(self.vision_tower(chunk)))
            for _ in range(len(chunk) if on_image is not None else 0):
                on_image()
        if not parts:
            raise InputError("encode_images needs at least one image")
        return torch.cat(parts)

    def prepare_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        on_image: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings [B, T, hidden], image groups [B, T]) with image features in place.

        Images fill the soft-token runs in reading order (row by row of the batch). Without images,
        soft tokens embed as padding, as in transformers. `image_features` (from `encode_images`)
        skips the vision tower, e.g. for an image already seen in an earlier turn. `on_image` ticks once
        per encoded image.
        """
        is_image = input_ids == self.config.image_token_id
        # The soft-token id sits past a 262,144-row vocabulary (GGUF text models): never index with it.
        embeds = self.language_model.embed(input_ids.masked_fill(is_image, self.config.text.pad_token_id))
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, on_image)
        if image_features is not None:
            slots, given = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
            if slots != given:
                raise InputError(
                    f"the prompt has {slots} image soft tokens but {image_features.shape[0]} image(s) give {given}; "
                    "build prompts with the multimodal processor"
                )
            embeds = embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))
        return embeds, image_groups(input_ids, self.config.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V]; the arguments after `pixel_values` mean what they mean in Gemma3Text."""
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("give input_ids or inputs_embeds")
            inputs_embeds, id_groups = self.prepare_embeds(input_ids, pixel_values)
            groups = id_groups if groups is None else groups
        elif pixel_values is not None:
            raise InputError("pixel_values go with input_ids; inputs_embeds already hold the images")
        return self.language_model(
            inputs_embeds=inputs_embeds, positions=positions, groups=groups, cache=cache, last_only=last_only,
            return_hidden=return_hidden,
        )
