"""HF checkpoint folders (config.json + safetensors, single or sharded) -> config dict and tensors.

Key layouts we read, all mapped to the names of nn/text.py (`layers.N...`, `embed_tokens`, `norm`):
- plain Gemma3ForCausalLM: `model.layers.*`, `lm_head.weight`;
- published multimodal (google/medgemma-*, gemma-3-*-it): `language_model.model.*`;
- transformers 4.52+ and 5.x saves of Gemma3ForConditionalGeneration: `model.language_model.*`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from medgem.errors import CheckpointError
from medgem.weights.lazy import LazyRows

TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def safetensors_files(folder: Path) -> list[Path]:
    """The shard list from model.safetensors.index.json, else every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    return files


def read_tensors(folder: Path, dtype: torch.dtype, select=lambda key: key) -> dict[str, torch.Tensor]:
    """Tensors whose key `select(key)` maps to a name (None drops it), cast to `dtype`."""
    return {name: rows.read().to(dtype) for name, rows in lazy_tensors(folder, select).items()}


class SafetensorsRows(LazyRows):
    """Rows of one safetensors tensor, sliced from the file without reading the rest."""

    def __init__(self, file: Path, key: str, shape: list[int]):
        self.file, self.key, self.shape = file, key, tuple(shape)
        self._handle = None  # set by hold()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        with safe_open(self.file, framework="pt") as f:
            part = f.get_slice(self.key)
            return part[:] if len(self.shape) == 1 else part[rows]

    def hold(self) -> None:
        if self._handle is None:
            self._handle = safe_open(self.file, framework="pt")

    def __getstate__(self) -> dict:  # copies reopen the file by path
        return {**self.__dict__, "_handle": None}

    def _rows(self, numbers: list[int]) -> torch.Tensor:
        self.hold()
        part = self._handle.get_slice(self.key)
        return torch.cat([part[n:n + 1] for n in numbers]).float()


def lazy_tensors(folder: Path, select=lambda key: key) -> dict[str, SafetensorsRows]:
    """Like `read_tensors`, but nothing is read until a tensor's rows are asked for."""
    tensors: dict[str, SafetensorsRows] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = select(key)
                    if name is not None:
                        tensors[name] = SafetensorsRows(file, key, f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises SafetensorError on truncated/corrupt headers
            raise CheckpointError(f"{file.name} is not a readable safetensors file (truncated?): {exc}") from exc
    return tensors


def text_key(key: str) -> str | None:
    """Our text-model name for a checkpoint key, or None for non-text keys (vision tower, projector)."""
    if key in LM_HEAD_KEYS:
        return "lm_head.weight"
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("vision_tower", "multi_modal_projector", "language_model.")):
                return None
            return rest
    return None
