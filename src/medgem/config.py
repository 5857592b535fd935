"""Model configurations.

One dataclass per tower. Presets cover the published sizes; `from_hf_config` reads config.json in
both the transformers 4.5x format (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`) and the 5.x one (`rope_parameters`, `layer_types`), including the
`text_config` of a multimodal config; `from_gguf_metadata` reads llama.cpp's keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from medgem.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's layout: every `pattern`-th layer is global, the rest slide (5 local to 1 global)."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


@dataclass
class TextConfig:
    """The Gemma 3 decoder. Field names follow transformers so configs map one to one."""

    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=lambda: gemma3_layer_types(18))
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # linear scaling, global layers only
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32_768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config lists {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers"
            )
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ConfigError(f"unknown layer type(s) {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        self.eos_token_ids = tuple(self.eos_token_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_preset(layers: int, hidden: int, ffn: int, heads: int, kv: int, head_dim: int, **kw: Any) -> TextConfig:
    return TextConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        layer_types=gemma3_layer_types(layers),
        **kw,
    )


# Text towers of the published checkpoints (google/gemma-3-*, google/medgemma-*).
TEXT_PRESETS: dict[str, TextConfig] = {
    "270m": _text_preset(18, 640, 2048, 4, 1, 256, sliding_window=512, max_position_embeddings=32_768),
    "1b": _text_preset(26, 1152, 6912, 4, 1, 256, sliding_window=512, max_position_embeddings=32_768),
    "4b": _text_preset(
        34, 2560, 10240, 8, 4, 256, sliding_window=1024, max_position_embeddings=131_072,
        rope_scaling_factor=8.0, vocab_size=262_208,
    ),
    "27b": _text_preset(
        62, 5376, 21504, 32, 16, 128, query_pre_attn_scalar=168, sliding_window=1024,
        max_position_embeddings=131_072, rope_scaling_factor=8.0, vocab_size=262_208,
    ),
}


def tiny_text_config(**overrides: Any) -> TextConfig:
    """A small config with both layer types, GQA and a short window: for tests and examples."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=gemma3_layer_types(7), max_position_embeddings=256, rope_scaling_factor=2.0,
    )
    base.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        base["layer_types"] = gemma3_layer_types(base["num_hidden_layers"])
    return TextConfig(**base)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, float, float]:
    """(global theta, local theta, linear factor) from either config format."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):  # transformers 5.x
        full = params.get(FULL) or {}
        local = params.get(SLIDING) or {}
        scaling = full
    else:
        full = {"rope_theta": d.get("rope_theta")}
        local = {"rope_theta": d.get("rope_local_base_freq")}
        scaling = d.get("rope_scaling") or (params if isinstance(params, dict) else {}) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'default' and 'linear')")
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    return (
        float(full.get("rope_theta") or 1_000_000.0),
        float(local.get("rope_theta") or 10_000.0),
        factor,
    )


def from_hf_config(d: dict[str, Any]) -> TextConfig:
    """The text config from a config.json dict (a Gemma3ForCausalLM or a multimodal Gemma3 config)."""
    if "text_config" in d:
        d = dict(d["text_config"] or {})
    if d.get("model_type") not in (None, "gemma3_text", "gemma3", "gemma2", "gemma"):
        raise ConfigError(f"model_type {d.get('model_type')!r} is not a Gemma 3 text model")
    defaults = TextConfig()
    layers = int(d.get("num_hidden_layers", 26))
    layer_types = d.get("layer_types") or gemma3_layer_types(layers, int(d.get("sliding_window_pattern", 6)))
    global_theta, local_theta, factor = _rope_from_hf(d)
    eos = d.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos, 106)
    head_dim = int(d.get("head_dim", 256))
    try:
        return TextConfig(
            vocab_size=int(d.get("vocab_size", 262_208)),
            hidden_size=int(d.get("hidden_size", 2304)),
            intermediate_size=int(d.get("intermediate_size", 9216)),
            num_hidden_layers=layers,
            num_attention_heads=int(d.get("num_attention_heads", 8)),
            num_key_value_heads=int(d.get("num_key_value_heads", 4)),
            head_dim=head_dim,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", head_dim)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            sliding_window=int(d.get("sliding_window") or 4096),
            layer_types=list(layer_types),
            rope_theta=global_theta,
            rope_local_base_freq=local_theta,
            rope_scaling_factor=factor,
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
            bos_token_id=int(d.get("bos_token_id", 2) or 2),
            eos_token_ids=eos_ids,
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", defaults.tie_word_embeddings)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config.json has a field of the wrong type: {exc}") from exc


def to_hf_config(cfg: TextConfig) -> dict[str, Any]:
    """A transformers 5.x `Gemma3TextConfig` dict, for exports that transformers loads."""
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        full_rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "rms_norm_eps": cfg.rms_norm_eps,
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types,
        "rope_parameters": {FULL: full_rope, SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}},
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def from_gguf_metadata(meta: dict[str, Any]) -> TextConfig:
    """The text config from GGUF key/values (llama.cpp's `gemma3.*` keys)."""
    arch = meta.get("general.architecture")
    if arch not in ("gemma3", "gemma3_text"):
        raise ConfigError(f"GGUF architecture {arch!r} is not gemma3")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
        return value

    layers = int(get("block_count"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length"))
    pattern = int(meta.get(f"{arch}.attention.sliding_window_pattern", 6) or 6)
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
    vocab = meta.get("tokenizer.ggml.tokens_count") or len(meta.get("tokenizer.ggml.tokens", ())) or 262_144
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 1))
    return TextConfig(
        vocab_size=int(vocab),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        # llama.cpp stores no query_pre_attn_scalar; every Gemma 3 size but 27B uses head_dim.
        query_pre_attn_scalar=float(meta.get(f"{arch}.attention.query_pre_attn_scalar", 0) or (
            168 if int(get("embedding_length")) == 5376 else head_dim)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        sliding_window=int(get("attention.sliding_window", 4096)),
        layer_types=gemma3_layer_types(layers, pattern),
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(meta.get(f"{arch}.rope.local.freq_base", 10_000.0) or 10_000.0),
        rope_scaling_factor=factor,
        attn_logit_softcapping=meta.get(f"{arch}.attn_logit_softcapping"),
        final_logit_softcapping=meta.get(f"{arch}.final_logit_softcapping"),
        max_position_embeddings=int(get("context_length", 32_768)),
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_ids=(eos, 106),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    )


__all__ = [
    "FULL",
    "SLIDING",
    "TEXT_PRESETS",
    "TextConfig",
    "from_gguf_metadata",
    "from_hf_config",
    "gemma3_layer_types",
    "replace",
    "tiny_text_config",
    "to_hf_config",
]


# -- Vision tower and multimodal model --------------------------------------------------------------


@dataclass
class VisionConfig:
    """A SigLIP ViT. Field names follow transformers' `SiglipVisionConfig`, and so do the defaults, which
    fill in whatever a config.json leaves out (published vision_configs list only a few fields)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = False  # the attention-pooling head: MedSigLIP uses it, MedGemma does not

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MultimodalConfig:
    """MedGemma / Gemma 3 multimodal: a SigLIP tower, an average-pool + RMSNorm + linear projector, and
    the Gemma 3 decoder. Each image becomes `mm_tokens_per_image` soft tokens between BOI and EOI."""

    text: TextConfig
    vision: VisionConfig
    mm_tokens_per_image: int = 256
    image_token_id: int = 262_144
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000

    def __post_init__(self) -> None:
        side = self.tokens_per_side
        if side * side != self.mm_tokens_per_image:
            raise ConfigError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a square number")
        if self.vision.patches_per_side % side:
            raise ConfigError(
                f"{self.vision.patches_per_side}x{self.vision.patches_per_side} patches cannot be average-pooled "
                f"to {side}x{side} image tokens"
            )

    @property
    def tokens_per_side(self) -> int:
        return round(self.mm_tokens_per_image**0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _so400m(image_size: int, **kw: Any) -> VisionConfig:
    return VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=image_size, patch_size=14, **kw,
    )


VISION_PRESETS: dict[str, VisionConfig] = {
    "so400m-896": _so400m(896),  # MedGemma 4B / 27B multimodal and Gemma 3 4B+ vision towers
    "medsiglip-448": _so400m(448, vision_use_head=True),  # MedSigLIP's image encoder
}

MULTIMODAL_PRESETS: dict[str, MultimodalConfig] = {
    size: MultimodalConfig(text=replace(TEXT_PRESETS[size]), vision=replace(VISION_PRESETS["so400m-896"]))
    for size in ("4b", "27b")
}


def tiny_vision_config(**overrides: Any) -> VisionConfig:
    """A 28 px, 7 px-patch tower (16 patches): for tests and examples."""
    base: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7,
    )
    base.update(overrides)
    return VisionConfig(**base)


def vision_from_hf_config(d: dict[str, Any]) -> VisionConfig:
    """A `vision_config` block (or a whole SigLIP vision config.json) -> VisionConfig."""
    if d.get("model_type") not in (None, "siglip_vision_model", "siglip"):
        raise ConfigError(f"vision model_type {d.get('model_type')!r} is not a SigLIP vision tower")
    if d.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"vision activation {d.get('hidden_act')!r} is not supported (SigLIP uses tanh-GELU)")
    defaults = VisionConfig()
    try:
        return VisionConfig(**{k: type(getattr(defaults, k))(d[k]) for k in asdict(defaults) if d.get(k) is not None})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"vision_config has a field of the wrong type: {exc}") from exc


def is_multimodal_hf_config(d: dict[str, Any]) -> bool:
    """Whether a config.json describes an image-reading Gemma 3 (not a text-only Gemma3ForCausalLM)."""
    return d.get("model_type") == "gemma3" or "vision_config" in d


def multimodal_from_hf_config(d: dict[str, Any]) -> MultimodalConfig:
    """A Gemma3ForConditionalGeneration config.json (transformers 4.5x or 5.x) -> MultimodalConfig.

    Token ids are stored as `*_token_index` by both formats; `*_token_id` is accepted as an alias.
    """
    if not is_multimodal_hf_config(d):
        raise ConfigError("config.json has no vision_config: this is a text-only model")

    def token(name: str) -> int:
        value = d.get(f"{name}_index", d.get(f"{name}_id"))
        return int(value) if value is not None else MultimodalConfig.__dataclass_fields__[f"{name}_id"].default

    return MultimodalConfig(
        text=from_hf_config(d),
        vision=vision_from_hf_config(dict(d.get("vision_config") or {})),
        mm_tokens_per_image=int(d.get("mm_tokens_per_image") or 256),
        image_token_id=token("image_token"),
        boi_token_id=token("boi_token"),
        eoi_token_id=token("eoi_token"),
    )


def vision_from_gguf_metadata(meta: dict[str, Any]) -> tuple[VisionConfig, int, int]:
    """llama.cpp's Gemma 3 mmproj metadata (`clip.vision.*`) -> (VisionConfig, mm_tokens_per_image,
    projection_dim). llama.cpp stores the pooling factor only when it differs from Gemma 3's 4."""
    if meta.get("general.architecture") != "clip":
        raise ConfigError(f"GGUF architecture {meta.get('general.architecture')!r} is not an mmproj (clip) file")
    projector = meta.get("clip.projector_type", meta.get("clip.vision.projector_type"))
    if projector != "gemma3":
        raise ConfigError(f"mmproj projector type {projector!r} is not Gemma 3's ('gemma3')")

    def get(key: str) -> Any:
        if f"clip.vision.{key}" not in meta:
            raise ConfigError(f"mmproj metadata lacks clip.vision.{key}")
        return meta[f"clip.vision.{key}"]

    vision = VisionConfig(
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(get("attention.head_count")),
        image_size=int(get("image_size")),
        patch_size=int(get("patch_size")),
        # GGUF keeps it as float32 (1e-6 reads back as 9.99999997e-07): restore the decimal that was written.
        layer_norm_eps=float(f"{float(meta.get('clip.vision.attention.layer_norm_epsilon', 1e-6)):.7g}"),
    )
    pool = int(meta.get("clip.vision.projector.scale_factor", 4) or 4)
    if vision.patches_per_side % pool:
        raise ConfigError(f"mmproj pooling factor {pool} does not divide {vision.patches_per_side} patches")
    return vision, (vision.patches_per_side // pool) ** 2, int(get("projection_dim"))


__all__ += [
    "MULTIMODAL_PRESETS",
    "VISION_PRESETS",
    "MultimodalConfig",
    "VisionConfig",
    "is_multimodal_hf_config",
    "multimodal_from_hf_config",
    "tiny_vision_config",
    "vision_from_gguf_metadata",
    "vision_from_hf_config",
]
