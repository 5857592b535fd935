"""GGUF files (llama.cpp, Ollama) -> metadata and tensors, through the `gguf` package.

llama.cpp's converter renames tensors (`blk.N.attn_q`) and stores Gemma's zero-centred norm weights
as `w + 1`; both are undone here so the result is an HF-named state dict.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgem.errors import CheckpointError

# llama.cpp leaf name -> our (HF) name inside a decoder layer.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader`, with truncation and format errors turned into CheckpointError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt): {exc}") from exc
    if end > path.stat().st_size:
        raise CheckpointError(f"{path.name} is truncated: tensors end at byte {end}, file has {path.stat().st_size}")
    return reader


def metadata(reader) -> dict[str, Any]:
    """Scalar and array fields as Python values; the big tokenizer arrays are left to the tokenizer."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            out[f"{key}_count"] = len(field.data)
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an unreadable optional field is simply absent
            continue
    return out


def hf_name(gguf_name: str) -> str | None:
    """Our state-dict key for a llama.cpp tensor name, or None for tensors we do not use."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, leaf, kind = m.groups()
        target = _LAYER_NAMES.get(leaf)
        return f"layers.{layer}.{target}.{kind}" if target else None
    stem, _, kind = gguf_name.rpartition(".")
    target = _TOP_NAMES.get(stem)
    return f"{target}.{kind}" if target else None


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as a float32 numpy array in PyTorch's [out, in] order."""
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def read_text_state_dict(reader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every text tensor, dequantized to `dtype`, with norms shifted back to zero-centred."""
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {tensor.name!r} in GGUF (not a Gemma 3 text weight)")
        array = dequantize(tensor)
        if name.endswith("norm.weight"):
            array = array - 1.0
        state[name] = torch.from_numpy(array).to(dtype)
    return state
