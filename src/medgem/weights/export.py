"""Writing checkpoints: HF safetensors folders that transformers loads, and GGUF (+ mmproj) for llama.cpp.

HF: the layout transformers 5.x itself saves (`model.*` for Gemma3ForCausalLM; `language_model.model.*`,
`vision_tower.*`, `multi_modal_projector.*` for Gemma3ForConditionalGeneration), a 5.x config
(`config.to_hf_config`), and the tokenizer: copied from an HF source folder, or rebuilt as
tokenizer.json from a GGUF source's vocabulary.

GGUF, with llama.cpp's conventions (convert_hf_to_gguf.py `Gemma3Model` / `Gemma3VisionModel`):
- tensors `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output|attn_q_norm|attn_k_norm|attn_norm|
  post_attention_norm|ffn_norm|post_ffw_norm|ffn_gate|ffn_up|ffn_down`, `output_norm` (and `output`
  only when the head is not tied), i.e. the inverse of weights/gguf_reader.py;
- Gemma's zero-centred RMSNorm weights are stored as w + 1 (llama.cpp multiplies by the stored value);
- embedding rows past the tokenizer's vocabulary (image tokens of multimodal models) are dropped, as
  llama.cpp's converter does; the mmproj file carries the vision tower and projector (`v.*`, `mm.*`);
- 1-D tensors stay F32; matrices take the chosen type (f32, f16, bf16 or q8_0).
The tokenizer comes from the source: a GGUF's fields are copied as they are; a tokenizer.json gives
its pieces, with scores ranking merges by piece order (the order medgem's own BPE rebuild uses).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from medgem.config import MultimodalConfig, TextConfig, to_hf_config
from medgem.errors import CapabilityError, CheckpointError, InputError
from medgem.weights import gguf_reader
from medgem.weights.gguf_reader import _LAYER_NAMES, _TOP_NAMES
from medgem.weights.multimodal import _MMPROJ_LAYER, _MMPROJ_TOP

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json", "generation_config.json")  # fmt: skip
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
# Our names -> llama.cpp's: the inverses of the readers' tables.
GGUF_LAYER = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}
GGUF_TOP = {ours: theirs for theirs, ours in _TOP_NAMES.items()}
MMPROJ_TOP = {ours: theirs for theirs, ours in _MMPROJ_TOP.items()}
MMPROJ_LAYER = {ours: theirs for theirs, ours in _MMPROJ_LAYER.items()}


def _text_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, TextConfig]:
    text = getattr(model, "language_model", model)
    return text, text.config


def _plain_state(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous copies (tied tensors de-duplicated by safetensors' rules: the tied head is dropped)."""
    state = {}
    for key, value in module.state_dict().items():
        if key == "lm_head.weight" and getattr(module.config, "tie_word_embeddings", False):
            continue
        value = value.detach().to("cpu")
        state[key] = (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()
    return state


def _check_plain(model: torch.nn.Module) -> None:
    """Exports need plain weights: adapters merged, no quantized kernels."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "qweight"):
            raise InputError(f"{name} is {type(module).__name__}: merge adapters into an unquantized model "
                             "before exporting (medgem finetune merge)")


# -- HF ---------------------------------------------------------------------------------------------


def hf_config(model: torch.nn.Module) -> dict[str, Any]:
    """config.json for a Gemma3Text (Gemma3ForCausalLM) or a Gemma3Multimodal (ConditionalGeneration)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, MultimodalConfig):
        return to_hf_config(cfg)
    text = {k: v for k, v in to_hf_config(cfg.text).items() if k != "architectures"}
    vision = {**asdict(cfg.vision), "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh"}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text, "vision_config": vision, "mm_tokens_per_image": cfg.mm_tokens_per_image,
        "image_token_index": cfg.image_token_id, "boi_token_index": cfg.boi_token_id,
        "eoi_token_index": cfg.eoi_token_id, "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our names -> the key layout transformers 5.x saves."""
    if not isinstance(getattr(model, "config", None), MultimodalConfig):
        return {f"model.{k}" if k != "lm_head.weight" else k: v for k, v in _plain_state(model, dtype).items()}
    text = {f"language_model.model.{k}" if k != "lm_head.weight" else "lm_head.weight": v
            for k, v in _plain_state(model.language_model, dtype).items()}
    others = {f"{part}.{k}": v.detach().to("cpu", dtype or v.dtype).contiguous()
              for part in ("vision_tower", "multi_modal_projector")
              for k, v in getattr(model, part).state_dict().items()}
    return text | others


def write_tokenizer_files(source: Path, folder: Path, image_token: bool) -> None:
    """Copy an HF source's tokenizer files, or build tokenizer.json from a GGUF source's vocabulary."""
    if source.is_dir():
        copied = [name for name in HF_TOKENIZER_FILES if (source / name).is_file()]
        if not {"tokenizer.json", "tokenizer.model"} & set(copied):
            raise CheckpointError(f"{source} has no tokenizer.json or tokenizer.model to export with the model")
        for name in copied:
            shutil.copy2(source / name, folder / name)
        return
    from tokenizers import AddedToken

    from medgem.processing.tokenizer import IMAGE_SOFT_TOKEN, tokenizer_from_gguf_fields

    vocab = gguf_vocab(source)
    tok = tokenizer_from_gguf_fields(vocab["tokens"], vocab["types"], vocab["unk"])
    if image_token:  # multimodal Gemma 3 appends it after the text vocabulary
        tok.add_special_tokens([AddedToken(IMAGE_SOFT_TOKEN, normalized=False, special=True)])
    tok.save(str(folder / "tokenizer.json"))
    names = {i: vocab["tokens"][i] for i in (vocab["bos"], vocab["eos"], vocab["pad"], vocab["unk"])}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[vocab["bos"]],
        "eos_token": names[vocab["eos"]], "pad_token": names[vocab["pad"]], "unk_token": names[vocab["unk"]],
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 1_000_000,
    }, indent=1))


def preprocessor_config(image_processor: Any) -> dict[str, Any]:
    """preprocessor_config.json for a processing.images.ImageProcessor (what Gemma3ImageProcessor reads)."""
    d = asdict(image_processor)
    size = d.pop("size")
    return {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": size, "width": size},
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, **d,
            "resample": int(d["resample"])}


def export_hf(model: torch.nn.Module, folder: str | Path, source: str | Path, *, dtype: torch.dtype | None = None,
              image_processor: Any = None) -> Path:
    """An HF checkpoint folder: config.json, model.safetensors, tokenizer (and preprocessor) files.

    `source` is the base checkpoint the model came from (HF folder or .gguf), for its tokenizer.
    """
    _check_plain(model)
    folder, source = Path(folder), Path(source)
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder} exists and is not empty; export into a new folder")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(model)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_file(hf_state_dict(model, dtype), tmp / "model.safetensors", metadata={"format": "pt"})
    multimodal = isinstance(getattr(model, "config", None), MultimodalConfig)
    write_tokenizer_files(source, tmp, image_token=multimodal)
    if image_processor is not None:
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image_processor), indent=1))
    if folder.exists():
        folder.rmdir()
    tmp.replace(folder)  # nothing half-written ever sits under the real name
    return folder


# -- GGUF -------------------------------------------------------------------------------------------


def gguf_vocab(source: str | Path) -> dict[str, Any]:
    """tokens, scores, types and special ids from a .gguf or an HF folder's tokenizer.json."""
    source = Path(source)
    if source.is_file():
        get = gguf_reader.read_header(source).fields.get
        if get("tokenizer.ggml.tokens") is None:
            raise CheckpointError(f"{source.name} has no tokenizer vocabulary")

        tokens = get("tokenizer.ggml.tokens")
        return {"tokens": tokens, "scores": get("tokenizer.ggml.scores", [0.0] * len(tokens)),
                "types": get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)),
                "bos": int(get("tokenizer.ggml.bos_token_id", 2)), "eos": int(get("tokenizer.ggml.eos_token_id", 1)),
                "pad": int(get("tokenizer.ggml.padding_token_id", 0)),
                "unk": int(get("tokenizer.ggml.unknown_token_id", 3))}
    path = source / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{source} has no tokenizer.json to build the GGUF vocabulary from")
    raw = json.loads(path.read_text())
    vocab: dict[str, int] = dict(raw["model"]["vocab"])
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    unk = raw["model"].get("unk_token") or "<unk>"

    def kind(i: int, piece: str) -> int:
        if i in added:
            return CONTROL if added[i].get("special") else USER_DEFINED
        if piece == unk:
            return UNKNOWN
        return BYTE if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") else NORMAL

    # Our GGUF reader spells runs of "▁" as llama.cpp does: with real spaces.
    shown = [" " * len(p) if p and not p.strip("\u2581") and len(p) > 1 else p for p in tokens]
    return {"tokens": shown, "scores": [-float(i) for i in range(len(tokens))],
            "types": [kind(i, p) for i, p in enumerate(tokens)],
            "bos": vocab.get("<bos>", 2), "eos": vocab.get("<eos>", 1), "pad": vocab.get("<pad>", 0),
            "unk": vocab.get(unk, 3)}


def _gguf_array(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors always F32."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or kind == "f32":
        return array.astype(np.float32), None
    if kind == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


def _write(writer, tensors: dict[str, tuple[np.ndarray, Any]]) -> None:
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_streamed(writer, tensors: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
                    tensor_type: str) -> None:
    """Tensor infos first, then each tensor made, converted and written in turn, so only one is in
    memory at a time (a 27B model does not fit as a dense whole)."""
    for name, (shape, _) in tensors.items():  # bytes per row from one converted row of zeros
        row, raw_dtype = _gguf_array(torch.zeros(shape[-1] if len(shape) == 1 else (1, shape[-1])), tensor_type)
        rows = 1 if len(shape) == 1 else shape[0]
        writer.add_tensor_info(name, shape, row.dtype if raw_dtype is None else np.float32, row.nbytes * rows,
                               raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, make in tensors.values():
        writer.write_tensor_data(_gguf_array(make(), tensor_type)[0])
    writer.close()


def gguf_text_name(key: str) -> str:
    """llama.cpp's tensor name for one of our text keys (`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    stem, kind = key.rsplit(".", 1)
    if stem.startswith("layers."):
        _, n, leaf = stem.split(".", 2)
        return f"blk.{n}.{GGUF_LAYER[leaf]}.{kind}"
    return f"{GGUF_TOP[stem]}.{kind}"


def export_gguf(model: torch.nn.Module, path: str | Path, source: str | Path, tensor_type: str = "f16",
                name: str = "medgem fine-tune") -> Path:
    """The text model as a llama.cpp GGUF (architecture gemma3); the vocabulary comes from `source`."""
    _check_plain(model)
    text, cfg = _text_parts(model)
    state = _plain_state(text, None)
    tensors = {key: (tuple(value.shape), lambda value=value: value) for key, value in state.items()}
    return export_gguf_tensors(cfg, tensors, path, source, tensor_type, name)


def export_gguf_tensors(cfg: TextConfig, tensors: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
                        path: str | Path, source: str | Path, tensor_type: str = "f16",
                        name: str = "medgem fine-tune") -> Path:
    """A llama.cpp GGUF from our text keys -> (shape, a function that makes the tensor), written one tensor
    at a time: models larger than memory (random-weight 27B checkpoints for benchmarks) stream to disk."""
    import gguf

    if tensor_type not in GGUF_TYPES:
        raise InputError(f"unknown GGUF tensor type {tensor_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    vocab = gguf_vocab(source)
    n_tokens = len(vocab["tokens"])
    if n_tokens > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {n_tokens} pieces but the model only {cfg.vocab_size} embeddings")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "gemma3")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(cfg.sliding_window)
    if cfg.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    # llama.cpp assumes these for Gemma 3; medgem's reader takes them when present (tiny or unusual configs).
    writer.add_float32("gemma3.rope.local.freq_base", cfg.rope_local_base_freq)
    writer.add_float32("gemma3.attention.query_pre_attn_scalar", cfg.query_pre_attn_scalar)
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    writer.add_uint32("gemma3.attention.sliding_window_pattern", full[0] + 1 if full else cfg.num_hidden_layers + 1)
    for key, cap in (("attn_logit_softcapping", cfg.attn_logit_softcapping),
                     ("final_logit_softcapping", cfg.final_logit_softcapping)):
        if cap is not None:
            writer.add_float32(f"gemma3.{key}", cap)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    stored = {}
    for key, (shape, make) in tensors.items():
        if key == "embed_tokens.weight":  # rows past the tokenizer (image tokens) are not text
            shape, make = (n_tokens, *shape[1:]), lambda make=make: make()[:n_tokens]
        if key.endswith("norm.weight"):
            make = lambda make=make: make().float() + 1.0  # noqa: E731 - bound per key
        stored[gguf_text_name(key)] = (shape, make)
    _write_streamed(writer, stored, tensor_type)
    tmp.replace(path)
    return path


def export_mmproj(model: torch.nn.Module, path: str | Path, image_processor: Any = None,
                  tensor_type: str = "f16") -> Path:
    """llama.cpp's Gemma 3 mmproj (architecture clip): the vision tower and projector of a multimodal model."""
    import gguf

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, MultimodalConfig):
        raise CapabilityError("the model has no vision tower, so there is no mmproj to export")
    _check_plain(model)
    vision = cfg.vision
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(cfg.text.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    mean = list(image_processor.image_mean) if image_processor is not None else [0.5] * 3
    std = list(image_processor.image_std) if image_processor is not None else [0.5] * 3
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_use_gelu(True)
    pool = vision.patches_per_side // cfg.tokens_per_side
    if pool != 4:
        writer.add_vision_projector_scale_factor(pool)
    tensors = {}
    for part in ("vision_tower", "multi_modal_projector"):
        for key, value in getattr(model, part).state_dict().items():
            full_key = f"{part}.{key}"
            if full_key in MMPROJ_TOP:
                gguf_name = MMPROJ_TOP[full_key]
            else:  # vision_tower.encoder.layers.N.<leaf>.<kind>
                _, _, n, rest = key.split(".", 3)
                leaf, kind = rest.rsplit(".", 1)
                gguf_name = f"v.blk.{n}.{MMPROJ_LAYER[leaf]}.{kind}"
            if key == "mm_soft_emb_norm.weight":
                value = value.float() + 1.0
            # llama.cpp keeps the patch and position embeddings in F32 whatever the output type.
            kind_here = "f32" if "embeddings." in key else tensor_type
            tensors[gguf_name] = _gguf_array(value, kind_here)
    _write(writer, tensors)
    tmp.replace(path)
    return path
