"""GGUF files (llama.cpp, Ollama) -> metadata and tensors, through the `gguf` package.

llama.cpp's converter renames tensors (`blk.N.attn_q`) and stores Gemma's zero-centred norm weights
as `w + 1`; both are undone here so the result is an HF-named state dict.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgem import cache
from medgem.errors import CheckpointError
from medgem.weights.lazy import LazyRows

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


# GGUF value type -> (struct format, size) for scalars; 8 = string, 9 = array (gguf.GGUFValueType).
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFHeader:
    """Every metadata field as a Python value (arrays as lists) and every tensor's place in the file."""

    fields: dict[str, Any]
    tensors: list[tuple[str, int, list[int], int, int]]  # name, ggml type, GGUF-order shape, offset, bytes


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF's header in one pass over a memory map: metadata and tensor locations, no tensor data.

    Why not gguf.GGUFReader: it builds a numpy view per array item, so a Gemma 3 vocabulary (262,144
    strings) takes 20-45 s on every first start of a new file; this reads the same fields in about a
    second (checked field for field against the reader in tests/weights). Lengths and counts are
    checked against the file size, so a corrupt or hostile header is a CheckpointError, never a huge
    allocation.
    """
    import struct

    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 24:
            raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt): {size} bytes")
        view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt: str, n: int) -> Any:
        nonlocal pos
        if pos + n > size:
            raise EOFError
        (value,) = struct.unpack_from(fmt, view, pos)
        pos += n
        return value

    def text() -> str:
        nonlocal pos
        n = take("<Q", 8)
        if pos + n > size:
            raise EOFError
        value = view[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return value

    def value(kind: int) -> Any:
        nonlocal pos
        if kind in _SCALARS:
            return take(*_SCALARS[kind])
        if kind == _STRING:
            return text()
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = take("<I", 4), take("<Q", 8)
        if item in _NUMPY:
            width = np.dtype(_NUMPY[item]).itemsize
            if pos + count * width > size:
                raise EOFError
            items = np.frombuffer(view, _NUMPY[item], count, pos).tolist()
            pos += count * width
            return items
        if count > size - pos:  # every item takes at least one byte
            raise EOFError
        return [value(item) for _ in range(count)]

    try:
        if view[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        pos = 4
        version, n_tensors, n_fields = take("<I", 4), take("<Q", 8), take("<Q", 8)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        if n_tensors > size or n_fields > size:
            raise EOFError
        fields = {}
        for _ in range(n_fields):
            key = text()
            fields[key] = value(take("<I", 4))
        infos = []
        for _ in range(n_tensors):
            name = text()
            dims = [take("<Q", 8) for _ in range(take("<I", 4))]
            infos.append((name, take("<I", 4), dims, take("<Q", 8)))
        alignment = int(fields.get("general.alignment", 32))
        start = -(-pos // alignment) * alignment
        tensors = []
        for name, kind, dims, offset in infos:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            tensors.append((name, kind, dims, start + offset, int(np.prod(dims, dtype=np.int64)) * block_bytes // block))
    except (EOFError, struct.error):
        raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt): the header ends "
                              "early") from None
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt): {exc}") from None
    finally:
        view.close()
    end = max((offset + n for _, _, _, offset, n in tensors), default=0)
    if end > size:
        raise CheckpointError(f"{path.name} is truncated: tensors end at byte {end}, file has {size}")
    return GGUFHeader(fields, tensors)


_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def metadata(header: GGUFHeader) -> dict[str, Any]:
    """Scalar and array fields as Python values; the big tokenizer arrays only as counts (the tokenizer
    reads them itself)."""
    return {(f"{k}_count" if k in _VOCAB_ARRAYS else k): (len(v) if k in _VOCAB_ARRAYS else v)
            for k, v in header.fields.items()}


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
    return np.array(array, dtype=np.float32).reshape(shape)  # a copy: F32 tensors arrive as read-only file views


INT4_GROUP = 32  # the weights per scale of every 4-bit GGUF type read exactly below


def int4_codes(raw: np.ndarray, kind: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a Q4_0, Q4_1 or Q4_K tensor as the file stores them: (codes [rows, n] in 0..15, scale and
    low [rows, n / 32]), each weight exactly `code * scale + low` of its 32-weight group.

    `raw` is [rows, bytes per row]. An int4 kernel with 32-wide groups then keeps the file's precision
    instead of rounding its 4-bit weights a second time onto a grid of its own.
    """
    import gguf

    rows = raw.shape[0]
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = raw.reshape(-1, block_bytes)
    if kind == gguf.GGMLQuantizationType.Q4_K:  # 256 weights: d, dmin, 6-bit scales and mins of 8 groups
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, mins = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scale, low = d * sc.astype(np.float32), -dmin * mins.astype(np.float32)
        nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32)  # 64 weights per 32 bytes: low nibbles, then high
    elif kind in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):  # 32 weights each
        scale = blocks[:, 0:2].view(np.float16).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.Q4_0:
            low = -8 * scale
        else:
            low = blocks[:, 2:4].view(np.float16).astype(np.float32)
        nibbles = blocks[:, -16:].reshape(-1, 1, 1, 16)  # weights 0..15 in low nibbles, 16..31 in high
    else:
        raise CheckpointError(f"GGUF type {kind.name} is not stored in 4-bit groups of {INT4_GROUP}")
    codes = (nibbles >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    groups = raw.shape[1] // block_bytes * block // INT4_GROUP
    return (torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(scale.reshape(rows, groups)),
            torch.from_numpy(low.reshape(rows, groups)))


def text_tensors(index: GGUFIndex) -> dict[str, LazyRows]:
    """Every text tensor by our name, read on demand (norms shifted back to zero-centred)."""
    tensors: dict[str, LazyRows] = {}
    for entry in index.tensors:
        name = hf_name(entry.name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {entry.name!r} in GGUF (not a Gemma 3 text weight)")
        tensors[name] = GGUFRows(entry, shift=-1.0 if name.endswith("norm.weight") else 0.0, index=index)
    return tensors


class GGUFRows(LazyRows):
    """Rows of a GGUF tensor, dequantized to float32 from plain file reads (no mmap, so the file's pages
    stay in the page cache instead of this process's RSS). GGUF quantizes along each row, so any row
    range is a whole number of quant blocks."""

    def __init__(self, entry: TensorEntry, shift: float = 0.0, index: GGUFIndex | None = None):
        import gguf

        self.entry, self.shift, self.index = entry, shift, index
        self._file = None  # set by hold()
        self.shape = tuple(int(d) for d in reversed(entry.shape))
        block, block_bytes = gguf.GGML_QUANT_SIZES[entry.tensor_type]
        bits = 8 * block_bytes / block
        self.stored_bits = None if bits >= 16 else bits
        four_bit = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K)
        self.int4_group = INT4_GROUP if entry.tensor_type in four_bit and len(self.shape) == 2 else None

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if len(self.shape) == 1:  # a vector is one row
            return self._read(0, 1).reshape(self.shape)
        start, stop, _ = rows.indices(self.shape[0])
        return self._read(start, stop).reshape(stop - start, *self.shape[1:])

    @property
    def _row_bytes(self) -> int:
        return self.entry.n_bytes // (self.shape[0] if len(self.shape) > 1 else 1)

    def _raw(self, start: int, stop: int) -> np.ndarray:
        """The stored bytes of rows start..stop-1, [rows, bytes per row]."""
        raw = np.fromfile(self.entry.path, dtype=np.uint8, count=(stop - start) * self._row_bytes,
                          offset=self.entry.data_offset + start * self._row_bytes)
        return raw.reshape(stop - start, self._row_bytes)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self._decode(self._raw(start, stop))

    @property
    def ggml_type(self) -> int:
        return int(self.entry.tensor_type)

    def blocks(self) -> torch.Tensor:
        """The tensor's stored blocks, uint8 [rows, bytes per row], as a view of the file's memory map:
        nothing is read or copied until a kernel touches it, and the pages are the page cache's."""
        mapped = (self.index or GGUFIndex.load(self.entry.path)).mapped
        return mapped[self.entry.data_offset:self.entry.data_offset + self.entry.n_bytes].view(-1, self._row_bytes)

    def int4_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows start..stop-1 as the file's 4-bit codes, scales and lows (see `int4_codes`)."""
        return int4_codes(self._raw(start, stop), self.entry.tensor_type)

    def hold(self) -> None:
        if self._file is None:
            self._file = open(self.entry.path, "rb", buffering=0)  # noqa: SIM115 - lives as long as the model

    def __getstate__(self) -> dict:  # copies reopen the file by path, and never carry the file's map
        return {**self.__dict__, "_file": None, "index": None}

    def _rows(self, numbers: list[int]) -> torch.Tensor:
        """One positioned read per row, decoded together: a 2,000-token prompt's lookup costs milliseconds."""
        self.hold()
        size, base, fd = self._row_bytes, self.entry.data_offset, self._file.fileno()
        raw = b"".join(os.pread(fd, size, base + n * size) for n in numbers)
        return self._decode(np.frombuffer(raw, dtype=np.uint8).reshape(len(numbers), size))

    def _decode(self, raw: np.ndarray) -> torch.Tensor:
        import gguf

        kind = self.entry.tensor_type
        typed = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        array = raw.view(typed[kind]) if kind in typed else gguf.quants.dequantize(raw, kind)
        out = torch.from_numpy(np.asarray(array, dtype=np.float32))
        return out + self.shift if self.shift else out


@dataclass
class TensorEntry:
    """Where one tensor lies in the file; `data` is a zero-copy memmap view shaped like gguf's reader."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: list[int]  # GGUF order (innermost first)
    data_offset: int
    n_bytes: int
    path: Path

    @property
    def data(self) -> np.ndarray:
        import gguf

        np_dims = tuple(reversed(self.shape))
        typed = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_offset, shape=(self.n_bytes,))
        if self.tensor_type in typed:
            return raw.view(typed[self.tensor_type]).reshape(np_dims)
        return raw.reshape(gguf.quant_shape_to_byte_shape(np_dims, self.tensor_type))


class GGUFIndex:
    """Metadata and tensor locations of a GGUF, cached as JSON so later loads skip parsing the file.

    gguf's reader parses every field, including 262k tokenizer strings, which costs seconds on each
    start; the index (keyed by path, size and mtime) costs milliseconds. The tokenizer has its own cache.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: list[TensorEntry], key: str):
        self.path, self.metadata, self.tensors, self.key = path, metadata, tensors, key

    @cached_property
    def mapped(self) -> torch.Tensor:
        """The whole file as a read-only uint8 tensor over one shared memory map, its pages read in at once
        (MAP_POPULATE, as llama.cpp does) so the first token does not wait on page faults."""
        with open(self.path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            end = max((t.data_offset + t.n_bytes for t in self.tensors), default=0)
            if end > size:  # mapping past the end would crash the process on first touch (SIGBUS)
                raise CheckpointError(f"{self.path.name} is truncated: tensors end at byte {end}, file has {size}")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            view = mmap.mmap(file.fileno(), size, flags=flags, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # read-only on purpose: nothing in medgem writes weights in place
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(view, dtype=torch.uint8)

    @cached_property
    def fields(self) -> dict[str, Any]:
        """Every metadata field, the vocabulary too, parsed only when something needs it (the tokenizer)."""
        return read_header(self.path).fields

    @classmethod
    def load(cls, path: str | Path, cache_dir: Path | None = None) -> GGUFIndex:
        import gguf

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"GGUF file not found: {path}")
        stat = path.stat()
        key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        cached = cache_dir / f"{key}.json" if cache_dir else None
        hit = cache.read(cached) if cached is not None else None
        if hit is not None:
            raw = json.loads(hit)
        else:
            header = read_header(path)
            raw = {"metadata": _jsonable(metadata(header)), "tensors": [list(t) for t in header.tensors]}
            if cached is not None:
                cache.write(cached, json.dumps(raw).encode())
        tensors = [TensorEntry(n, gguf.GGMLQuantizationType(t), s, o, b, path) for n, t, s, o, b in raw["tensors"]]
        return cls(path, raw["metadata"], tensors, key)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out
