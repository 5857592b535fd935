"""Multimodal checkpoints -> a ready `Gemma3Multimodal`: HF folders in every layout, or GGUF + mmproj.

HF key layouts, all mapped to nn/medgemma.py names (`language_model.*`, `vision_tower.*`,
`multi_modal_projector.*`):
- published google/medgemma-* and gemma-3-*-it: `language_model.model.*`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`;
- transformers 4.52-4.5x saves: `model.language_model.*`, `model.vision_tower.vision_model.*`,
  `model.multi_modal_projector.*`, `lm_head.weight`;
- transformers 5.x saves: `language_model.model.*`, `vision_tower.*` (no `vision_model.`),
  `multi_modal_projector.*`.

llama.cpp splits a multimodal Gemma 3 into a text GGUF and an "mmproj" GGUF holding the vision tower
and projector (`v.*`, `mm.*`, architecture `clip`). Its converter keeps every tensor in HF's layout
(GGUF lists dims in reverse, which `gguf_reader.dequantize` undoes) and stores the projector norm as
w + 1; both are undone here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from medgem.config import MultimodalConfig, multimodal_from_hf_config, vision_from_gguf_metadata
from medgem.errors import CheckpointError, ConfigError
from medgem.nn.medgemma import Gemma3Multimodal
from medgem.weights import (
    build_text_model,
    check_state_dict,
    gguf_reader,
    hf,
    read_text_checkpoint,
    resolve_dtype,
)

VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
PARTS = ("language_model", "vision_tower", "multi_modal_projector")


def multimodal_key(key: str) -> str | None:
    """Our name for an HF checkpoint key; unknown keys come back unchanged so the check reports them."""
    for prefix in VISION_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            # SigLIP's attention-pooling head: Gemma 3 never runs it, tiny test checkpoints still ship it.
            return None if rest.startswith("head.") else f"vision_tower.{rest}"
    for prefix in PROJECTOR_PREFIXES:
        if key.startswith(prefix):
            return f"multi_modal_projector.{key[len(prefix):]}"
    name = hf.text_key(key)
    return key if name is None else f"language_model.{name}"


# -- llama.cpp mmproj names -------------------------------------------------------------------------
_MMPROJ_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_MMPROJ_TOP = {
    "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "vision_tower.embeddings.patch_embedding.bias",
    "v.position_embd.weight": "vision_tower.embeddings.position_embedding.weight",
    "v.post_ln.weight": "vision_tower.post_layernorm.weight",
    "v.post_ln.bias": "vision_tower.post_layernorm.bias",
    "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",
}
_MMPROJ_BLOCK = re.compile(r"^v\.blk\.(\d+)\.(\w+)\.(weight|bias)$")


def mmproj_name(gguf_name: str) -> str | None:
    """Our state-dict key for a llama.cpp mmproj tensor, or None if Gemma 3 has no such tensor."""
    m = _MMPROJ_BLOCK.match(gguf_name)
    if m:
        layer, leaf, kind = m.groups()
        target = _MMPROJ_LAYER.get(leaf)
        return f"vision_tower.encoder.layers.{layer}.{target}.{kind}" if target else None
    return _MMPROJ_TOP.get(gguf_name)


def read_mmproj(path: str | Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, vision + projector state dict) from a llama.cpp Gemma 3 mmproj GGUF."""
    index = gguf_reader.GGUFIndex.load(path)
    meta = index.metadata
    state: dict[str, torch.Tensor] = {}
    for tensor in index.tensors:
        name = mmproj_name(tensor.name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {tensor.name!r} in mmproj {Path(path).name} (not Gemma 3 vision)")
        array = gguf_reader.dequantize(tensor)
        if name.endswith("mm_soft_emb_norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's (1 + w)
        state[name] = torch.tensor(array, dtype=dtype)  # a copy: F32 tensors are read-only views of the file
    return meta, state


# -- building ---------------------------------------------------------------------------------------
def build_multimodal_model(
    cfg: MultimodalConfig, state: dict[str, torch.Tensor], source: str, device="cpu"
) -> Gemma3Multimodal:
    """A Gemma3Multimodal from our-named tensors; each part is checked for missing, extra and misshaped."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise CheckpointError(f"{source} has unexpected tensor {key!r}")
        parts[part][rest] = value
    with torch.device("meta"):
        model = Gemma3Multimodal(cfg)
    model.language_model = build_text_model(cfg.text, parts["language_model"], source, device)
    for name in PARTS[1:]:
        module = getattr(model, name)
        check_state_dict(module, parts[name], f"{source} ({name.replace('_', ' ')})")
        module.load_state_dict(parts[name], assign=True)
    return model.to(device).eval()


def read_preprocessor_config(folder: Path) -> dict | None:
    """preprocessor_config.json (image size, normalisation, pan-and-scan settings), if the folder has one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_multimodal_folder(folder: Path, dtype: torch.dtype) -> tuple[MultimodalConfig, dict[str, torch.Tensor], dict]:
    raw = hf.read_config(folder)
    cfg = multimodal_from_hf_config(raw)
    info = {"format": "hf", "config": raw, "preprocessor_config": read_preprocessor_config(folder)}
    return cfg, hf.read_tensors(folder, dtype, multimodal_key), info


def read_gguf_with_mmproj(
    text_gguf: Path, mmproj: Path, dtype: torch.dtype
) -> tuple[MultimodalConfig, dict[str, torch.Tensor], dict]:
    """A text GGUF plus its mmproj, checked to belong together (projection width = text hidden size)."""
    text_cfg, text_state, info = read_text_checkpoint(text_gguf, dtype)
    if info["format"] != "gguf":
        raise CheckpointError(f"{text_gguf}: an mmproj file goes with a text .gguf, not an HF folder")
    meta, vision_state = read_mmproj(mmproj, dtype)
    vision, mm_tokens, projection_dim = vision_from_gguf_metadata(meta)
    if projection_dim != text_cfg.hidden_size:
        raise CheckpointError(
            f"{Path(mmproj).name} projects to width {projection_dim}, but {Path(text_gguf).name} has hidden size "
            f"{text_cfg.hidden_size}: they are not parts of the same model"
        )
    try:
        cfg = MultimodalConfig(text=text_cfg, vision=vision, mm_tokens_per_image=mm_tokens)
    except ConfigError as exc:
        raise CheckpointError(f"{Path(mmproj).name}: {exc}") from exc
    state = {f"language_model.{k}": v for k, v in text_state.items()} | vision_state
    return cfg, state, {**info, "mmproj_metadata": meta}


def load_multimodal_model(
    src: str | Path, dtype=None, device="cpu", mmproj: str | Path | None = None
) -> tuple[Gemma3Multimodal, dict]:
    """A ready Gemma3Multimodal (eval mode) from an HF folder, or from a text .gguf plus `mmproj`."""
    torch_dtype = resolve_dtype(dtype)
    path = Path(src)
    if mmproj is not None:
        cfg, state, info = read_gguf_with_mmproj(path, Path(mmproj), torch_dtype)
    elif path.is_dir():
        cfg, state, info = read_multimodal_folder(path, torch_dtype)
    else:
        raise CheckpointError(f"{path.name}: a GGUF model reads images only with its mmproj file (pass mmproj=...)")
    return build_multimodal_model(cfg, state, path.name, device), info
