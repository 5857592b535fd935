"""SigLIP checkpoints (HF `SiglipModel` folders, e.g. google/medsiglip-448) <-> `nn.siglip.SiglipModel`.

The published layout and the one transformers 4.x and 5.x save are the same: `vision_model.*`
(embeddings, encoder, post_layernorm, head), `text_model.*` (embeddings, encoder,
final_layer_norm, head), `logit_scale`, `logit_bias`. Our module names match, so keys load as
they are; a `position_ids` buffer that old saves carry is dropped. `save_siglip` writes a folder
that transformers' `SiglipModel.from_pretrained` reads back (fine-tuned checkpoints stay portable).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medgem.config import vision_from_hf_config
from medgem.errors import CheckpointError, ConfigError
from medgem.nn.siglip import SiglipConfig, SiglipModel, SiglipTextConfig
from medgem.weights import check_state_dict, hf, resolve_dtype

# Files that travel with the weights: the tokenizer and the image preprocessing settings.
SIDE_FILES = (
    "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
)


def text_from_hf_config(d: dict[str, Any]) -> SiglipTextConfig:
    """A `text_config` block -> SiglipTextConfig; absent fields take transformers' defaults."""
    if d.get("model_type") not in (None, "siglip_text_model"):
        raise ConfigError(f"text model_type {d.get('model_type')!r} is not a SigLIP text tower")
    if d.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"text activation {d.get('hidden_act')!r} is not supported (SigLIP uses tanh-GELU)")
    fields = {k for k in SiglipTextConfig.__dataclass_fields__ if k not in ("pad_token_id", "eos_token_id")}
    try:
        return SiglipTextConfig(**{k: int(d[k]) if k != "layer_norm_eps" else float(d[k])
                                   for k in fields if d.get(k) is not None})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"text_config has a field of the wrong type: {exc}") from exc


def siglip_from_hf_config(d: dict[str, Any]) -> SiglipConfig:
    """A `SiglipModel` config.json -> SiglipConfig (the vision head is always on in a dual encoder)."""
    if d.get("model_type") not in (None, "siglip"):
        raise ConfigError(f"model_type {d.get('model_type')!r} is not a SigLIP dual encoder (expected 'siglip')")
    if "text_config" not in d or "vision_config" not in d:
        raise ConfigError("config.json lacks text_config or vision_config: not a SigLIP dual encoder")
    vision = vision_from_hf_config({**(d["vision_config"] or {}), "vision_use_head": True})
    return SiglipConfig(text=text_from_hf_config(d["text_config"] or {}), vision=vision)


def to_hf_config(cfg: SiglipConfig) -> dict[str, Any]:
    """A transformers `SiglipConfig` dict for `save_siglip`."""
    text = {k: v for k, v in asdict(cfg.text).items() if k != "eos_token_id"}
    vision: dict[str, Any] = asdict(cfg.vision)
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {**text, "model_type": "siglip_text_model", "hidden_act": "gelu_pytorch_tanh"},
        "vision_config": {**vision, "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh"},
    }


def siglip_key(key: str) -> str | None:
    """Our name for a checkpoint key (the same, bar the prefix of a wrapped save); None drops it."""
    if key.endswith("position_ids"):
        return None
    return key.removeprefix("model.")


def read_siglip_folder(folder: Path, dtype: torch.dtype) -> tuple[SiglipConfig, dict[str, torch.Tensor], dict]:
    raw = hf.read_config(folder)
    try:
        cfg = siglip_from_hf_config(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{folder.name}: {exc}") from exc
    return cfg, hf.read_tensors(folder, dtype, siglip_key), {"format": "hf", "config": raw}


def build_siglip_model(cfg: SiglipConfig, state: dict[str, torch.Tensor], source: str, device="cpu") -> SiglipModel:
    """A SiglipModel from a checked state dict (missing, extra or misshaped tensors are CheckpointErrors)."""
    with torch.device("meta"):
        model = SiglipModel(cfg)
    check_state_dict(model, state, source)
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def load_siglip_model(src: str | os.PathLike[str], dtype=None, device="cpu") -> tuple[SiglipModel, dict]:
    """A ready SiglipModel (eval mode) and the checkpoint info, from an HF folder."""
    folder = Path(src)
    if not folder.is_dir():
        raise CheckpointError(f"{folder.name}: a SigLIP checkpoint is a folder (config.json + *.safetensors)")
    cfg, state, info = read_siglip_folder(folder, resolve_dtype(dtype))
    return build_siglip_model(cfg, state, folder.name, device), info


def save_siglip(model: SiglipModel, folder: str | os.PathLike[str], side_files_from: str | os.PathLike[str] | None = None
                ) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer and preprocessor files found in
    `side_files_from`) into `folder`; transformers loads the result."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_hf_config(model.config), indent=2))
    if side_files_from is not None:
        for name in SIDE_FILES:
            source = Path(side_files_from) / name
            if source.is_file() and source.resolve() != (out / name).resolve():
                (out / name).write_bytes(source.read_bytes())
    return out


__all__ = [
    "build_siglip_model",
    "load_siglip_model",
    "read_siglip_folder",
    "save_siglip",
    "siglip_from_hf_config",
    "siglip_key",
    "to_hf_config",
]
