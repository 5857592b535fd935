"""Our SigLIP tower against transformers' SiglipVisionModel, and the vision config readers."""

from __future__ import annotations

import pytest
import torch

from medgem.config import (
    MULTIMODAL_PRESETS,
    VISION_PRESETS,
    VisionConfig,
    multimodal_from_hf_config,
    tiny_vision_config,
    vision_from_gguf_metadata,
    vision_from_hf_config,
)
from medgem.errors import ConfigError
from medgem.nn.vision import EncoderLayer, SiglipVisionTower


def reference(cfg: VisionConfig):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(**{**cfg.to_dict(), "vision_use_head": False})).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them so their affine part is checked
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return ref


@pytest.mark.parametrize(
    "cfg",
    [tiny_vision_config(), tiny_vision_config(hidden_size=96, num_attention_heads=6, image_size=56, patch_size=14)],
    ids=["tiny", "patch14"],
)
def test_matches_siglip_vision_model(cfg):
    ref = reference(cfg)
    ours = SiglipVisionTower(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # names map one to one
    pixels = torch.rand(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, cfg.num_patches, cfg.hidden_size)
    assert (got - expected).abs().max().item() <= 1e-5


def test_encoder_layer_mask_blocks_attention():
    """The text tower of SigLIP reuses EncoderLayer with a padding mask: masked keys must not matter."""
    torch.manual_seed(0)
    layer = EncoderLayer(hidden=16, heads=4, intermediate=32).eval()
    x = torch.randn(1, 5, 16)
    mask = torch.tensor([True, True, True, False, False])[None, None, None, :].expand(1, 1, 5, 5)
    changed = x.clone()
    changed[:, 3:] = torch.randn(1, 2, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x, mask)[:, :3], layer(changed, mask)[:, :3], atol=1e-6)
        assert not torch.allclose(layer(x)[:, :3], layer(changed)[:, :3], atol=1e-3)


def test_so400m_preset_has_the_published_size():
    with torch.device("meta"):
        tower = SiglipVisionTower(VISION_PRESETS["so400m-896"])
    # 27 x (4 biased 1152^2 projections, 2 LayerNorms, 1152x4304 MLP) + patch conv + 4096 positions + final LN
    assert sum(p.numel() for p in tower.parameters()) == 416_866_032
    assert VISION_PRESETS["so400m-896"].num_patches == 4096
    assert VISION_PRESETS["medsiglip-448"].num_patches == 1024 and VISION_PRESETS["medsiglip-448"].vision_use_head
    assert MULTIMODAL_PRESETS["4b"].tokens_per_side == 16 and MULTIMODAL_PRESETS["27b"].text.hidden_size == 5376


def test_published_medgemma_config_reads_with_siglip_defaults():
    """google/medgemma-4b-it's config.json lists only some vision fields; the rest are SigLIP defaults."""
    published = {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {"attention_bias": False, "head_dim": 256, "hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_attention_heads": 8, "num_hidden_layers": 34,
                        "num_key_value_heads": 4, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }
    cfg = multimodal_from_hf_config(published)
    assert cfg.vision == VISION_PRESETS["so400m-896"]
    assert (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, cfg.mm_tokens_per_image) == (262144, 255999, 256000, 256)
    assert cfg.text.hidden_size == 2560 and cfg.text.rope_scaling_factor == 8.0
    assert vision_from_hf_config({}) == VisionConfig()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "clip_vision_model"}, "not a SigLIP"),
        ({"hidden_act": "quick_gelu"}, "not supported"),
        ({"hidden_size": 100, "num_attention_heads": 16}, "not a multiple of num_attention_heads"),
        ({"image_size": 900, "patch_size": 14}, "not a multiple of patch_size"),
        ({"hidden_size": "wide"}, "wrong type"),
    ],
)
def test_bad_vision_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        vision_from_hf_config(config)


def test_pooling_must_fit_the_patch_grid():
    with pytest.raises(ConfigError, match="cannot be average-pooled to 5x5"):
        multimodal_from_hf_config({"model_type": "gemma3", "vision_config": {"image_size": 896, "patch_size": 14},
                                   "mm_tokens_per_image": 25})
    with pytest.raises(ConfigError, match="not a square"):
        multimodal_from_hf_config({"model_type": "gemma3", "mm_tokens_per_image": 200})


def test_mmproj_metadata():
    meta = {
        "general.architecture": "clip", "clip.projector_type": "gemma3", "clip.vision.embedding_length": 1152,
        "clip.vision.feed_forward_length": 4304, "clip.vision.block_count": 27, "clip.vision.attention.head_count": 16,
        "clip.vision.image_size": 896, "clip.vision.patch_size": 14, "clip.vision.projection_dim": 2560,
        "clip.vision.attention.layer_norm_epsilon": 1e-6,
    }
    assert vision_from_gguf_metadata(meta) == (VISION_PRESETS["so400m-896"], 256, 2560)
    assert vision_from_gguf_metadata({**meta, "clip.vision.projector.scale_factor": 8})[1] == 64
    with pytest.raises(ConfigError, match="'idefics3' is not Gemma 3"):
        vision_from_gguf_metadata({**meta, "clip.projector_type": "idefics3"})
    with pytest.raises(ConfigError, match="lacks clip.vision.patch_size"):
        vision_from_gguf_metadata({k: v for k, v in meta.items() if k != "clip.vision.patch_size"})
