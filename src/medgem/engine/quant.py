"""Weight-only quantization for CPU decoding: int8 per-channel and int4 group-wise.

Decode reads every weight once per token, so fewer bytes per weight is more tokens per second. Where
the CPU has AVX2, every quantized matmul runs on our block kernel over llama.cpp's blocks (engine/
blocks.py; a GGUF's own blocks in place); the rest of this module is what runs elsewhere. int8
matmuls run on our AVX-512 VNNI kernel where the CPU has it (engine/vnni.py: activations rounded to
int8 in blocks of 32, as llama.cpp does), else on PyTorch's `_weight_int8pack_mm`; int4 on PyTorch's
`_weight_int4pack_mm_for_cpu`. PyTorch's kernels are fast only with bf16 activations, so a quantized
model runs its activations in bf16.

The tied embedding / LM head (168M of the 270M model's parameters) is quantized too: an int8 head is
an `Int8Linear` with float32 output on the VNNI kernel, else an `Int8HeadLinear` (oneDNN's packed int8
GEMM). Its packed weight cannot serve the embedding lookup, so a model loaded from a checkpoint looks
its embedding rows up in the file (`CheckpointEmbedding`, as llama.cpp does with its mmap) instead of
holding a second copy of the table; a model quantized in memory keeps an int8 table (`Int8Embedding`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medgem.config import TextConfig
from medgem.engine import blocks, ckernel, vnni
from medgem.errors import InputError
from medgem.nn.text import Gemma3Text
from medgem.weights import check_state_dict
from medgem.weights.lazy import LazyRows

QUANT_MODES = ("none", "int8", "int4", "gguf")  # gguf: a GGUF's own blocks as stored, the rest int8
ACT_DTYPE = torch.bfloat16


ROW_CHUNK = 8192  # rows quantized at a time: bounds the float32 scratch of a 262k-row embedding to 21 MB


def _row_chunks(weight: torch.Tensor | LazyRows):
    """(start, stop, float32 rows) over a dense tensor or a checkpoint tensor read on demand."""
    for start in range(0, weight.shape[0], ROW_CHUNK):
        stop = min(start + ROW_CHUNK, weight.shape[0])
        yield start, stop, weight[start:stop].float()


def _round_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows -> (int8 rows, float32 scale per row), symmetric."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_rows(weight: torch.Tensor | LazyRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (output channel) int8: weight ~= q * scale[:, None], float32 scales."""
    q = torch.empty(tuple(weight.shape), dtype=torch.int8)
    scales = torch.empty(weight.shape[0])
    for start, stop, w in _row_chunks(weight):
        q[start:stop], scales[start:stop] = _round_rows(w)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with int8 weights.

    Where the CPU has AVX-512 VNNI the weights sit in that kernel's panels and activations are rounded
    to int8 in blocks of 32 (engine/vnni.py: twice as fast at 1 row, 2-3x at many); elsewhere they are
    plain int8 rows for PyTorch's `_weight_int8pack_mm`, with bf16 activations. `out_dtype` fixes the
    output's dtype (float32 for an LM head); by default it is the input's.
    """

    def __init__(self, weight: torch.Tensor | LazyRows, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.vnni = vnni.fits(self.out_features, self.in_features)
        if self.vnni:  # quantized and packed a chunk of rows at a time: no second full copy
            panels = torch.empty(self.out_features // vnni.PANEL, self.in_features // 4, vnni.PANEL, 4,
                                 dtype=torch.uint8)
            scales = torch.empty(self.out_features)
            for start, stop, rows in _row_chunks(weight):
                q, scales[start:stop] = _round_rows(rows)
                panels[start // vnni.PANEL:stop // vnni.PANEL] = vnni.pack(q)
            self.register_buffer("qweight", panels)
            self.register_buffer("scales", scales)
        else:
            q, scale = int8_rows(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale.to(ACT_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACT_DTYPE).contiguous()  # the kernels need dense rows
        if self.vnni:
            out = vnni.traceable_linear(flat, self.qweight, self.scales, self.out_dtype or ACT_DTYPE)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features).to(self.out_dtype or x.dtype)

    def int8_weight(self) -> torch.Tensor:
        return vnni.unpack(self.qweight) if self.vnni else self.qweight

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales.float()[:, None]

    @classmethod
    def stacked(cls, parts: tuple[Int8Linear, ...]) -> Int8Linear:
        """One linear over the parts' rows; the parts' weights become views of it (no extra memory)."""
        fused = _stack_rows(cls, parts)
        fused.register_buffer("scales", torch.cat([p.scales for p in parts]))
        fused.vnni, fused.out_dtype = parts[0].vnni, parts[0].out_dtype
        return fused


# oneDNN's int8 GEMM is exact only where the CPU has VNNI (or AMX): on plain AVX2 it multiplies with
# vpmaddubsw, whose 16-bit pair sums saturate on full-range int8 rows (measured: 4 % error on a Zen 3).
ONEDNN = torch.backends.mkldnn.is_available() and bool({"avx512_vnni", "avx_vnni", "amx_int8"} & ckernel.cpu_flags())


class Int8HeadLinear(nn.Module):
    """The LM head where the VNNI kernel is missing: each input row rounded to int8 with its own scale,
    times int8 weight rows.

    Integer sums are exact, so a row's logits never depend on the other rows of its batch. oneDNN's
    packed int8 GEMM (what PyTorch's own int8 inference lowers to) reads the 262k x 640 head once for
    all rows: 3.0 ms for 1 row and 5.0 ms for 8 on 2 cores, where `torch._int_mm` (the fallback where
    oneDNN is missing) takes 2.8 and 10.1 ms. Batched decoding and speculative checks are many rows.
    Quality on the 270M stays within the int8 targets (perplexity +0.58 %, greedy agreement 96.2 %).
    Every layer's activations rounded per row like this would cost +3.2 % perplexity; rounded in
    blocks of 32, as the VNNI kernel does, nothing measurable (benchmarks/quant_quality.py).
    """

    def __init__(self, weight: torch.Tensor | LazyRows):
        super().__init__()
        self._pack(*int8_rows(weight))

    def _pack(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.out_features, self.in_features = q.shape
        self.packed = ONEDNN
        self.register_buffer("qweight", torch.ops.onednn.qlinear_prepack(q, None) if self.packed else q)
        self.register_buffer("scales", scale.float())
        self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long))

    def __deepcopy__(self, memo: dict) -> Int8HeadLinear:  # a packed tensor has no storage to copy
        twin = type(self).__new__(type(self))
        nn.Module.__init__(twin)
        twin._pack(self.int8_weight().clone(), self.scales.clone())
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits, whatever x's dtype: bf16 logits would only add ties and two conversions."""
        rows = x.reshape(-1, self.in_features).float()
        step = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        ints = torch.round(rows / step)
        if self.packed:  # unsigned input with zero point 128 is the kernel's form of a signed int8 row
            out = torch.ops.onednn.qlinear_pointwise((ints + 128).to(torch.uint8), 1.0, 128, self.qweight, self.scales,
                                                     self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        else:
            out = torch._int_mm(ints.to(torch.int8), self.qweight.T).float() * self.scales
        return out.mul_(step).reshape(*x.shape[:-1], self.out_features)

    def int8_weight(self) -> torch.Tensor:
        return self.qweight.to_dense().T.contiguous() if self.packed else self.qweight

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]


INT4_PACK_ROWS = 64  # _convert_weight_to_int4pack_for_cpu interleaves rows within blocks of 64 (BLOCK_N)


def _int4_groups(weight: torch.Tensor | LazyRows, group_size: int):
    """(start, stop, codes in 0..15, scale, low) a chunk of rows at a time; w ~= code * scale + low in each
    group. A checkpoint that stores the tensor in 4-bit groups of this size gives its own codes (exact);
    any other source is rounded per group between the group's min and max."""
    if getattr(weight, "int4_group", None) == group_size:
        for start in range(0, weight.shape[0], ROW_CHUNK):
            stop = min(start + ROW_CHUNK, weight.shape[0])
            yield start, stop, *weight.int4_rows(start, stop)
        return
    for start, stop, rows in _row_chunks(weight):
        w = rows.reshape(stop - start, -1, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
        yield start, stop, codes.reshape(stop - start, -1), scale, lo


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 (groups along the input dimension), packed for the CPU kernel."""

    def __init__(self, weight: torch.Tensor | LazyRows, group_size: int = 32):
        super().__init__()
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise InputError(f"int4 group size {group_size} does not divide in_features {in_f}")
        packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8)  # the kernel's CPU layout: two per byte
        scales_zeros = torch.empty(out_f, in_f // group_size, 2, dtype=ACT_DTYPE)
        for start, stop, codes, scale, low in _int4_groups(weight, group_size):  # the layout is row by row
            packed[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
            scales_zeros[start:stop] = torch.stack([scale, zero], dim=-1)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", scales_zeros.transpose(0, 1).contiguous())
        self.group_size, self.out_features, self.in_features = group_size, out_f, in_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACT_DTYPE).contiguous()  # the kernels need dense rows
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @classmethod
    def stacked(cls, parts: tuple[Int4Linear, ...]) -> Int4Linear:
        """One linear over the parts' rows (each a whole number of the layout's `INT4_PACK_ROWS`-row
        blocks); the parts' packed weights become views of it, each keeps its own small scale table."""
        fused = _stack_rows(cls, parts)
        fused.register_buffer("scales_zeros", torch.cat([p.scales_zeros for p in parts], dim=1))
        fused.group_size = parts[0].group_size
        return fused


def _stack_rows(cls: type[nn.Module], parts: tuple[nn.Module, ...]) -> nn.Module:
    """A bare `cls` whose weight is the parts' weight rows stacked; each part's weight becomes a view."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
    fused.out_features, fused.in_features = sum(p.out_features for p in parts), parts[0].in_features
    sizes = [p.qweight.shape[0] for p in parts]  # rows, or panels of rows
    for part, rows in zip(parts, fused.qweight.split(sizes), strict=True):
        part.qweight = rows
    return fused


class FusedProjections:
    """Quantized linears that read the same input, run as one matmul over their stacked rows.

    At one row of activations a matmul's fixed cost matters: on 2 cores q, k and v take 24 + 11 + 11 us
    apart and 32 us stacked, gate and up 41 + 41 against 75 (measured apart from the model). A plain object, not a
    submodule, so state dicts and LoRA see only the parts; nn/text.py uses it while the parts are the
    ones stacked here.
    """

    def __init__(self, parts: tuple[Int8Linear, ...] | tuple[Int4Linear, ...]):
        self.parts = parts
        self.sizes = [p.out_features for p in parts]
        self.linear = type(parts[0]).stacked(parts)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def _fusable(*parts: nn.Module) -> FusedProjections | None:
    kinds = {type(p) for p in parts}
    if kinds == {blocks.BlockLinear}:
        return FusedProjections(parts)  # the block kernel takes parts of different types in one call
    if len(kinds) != 1 or kinds.pop() not in (Int8Linear, Int4Linear):
        return None  # int4 mode keeps the file's 6-8-bit tensors int8: mixed parts stay apart
    if len({getattr(p, "vnni", False) for p in parts}) != 1:
        return None  # VNNI panels and plain int8 rows (a part the kernel does not fit) cannot stack
    if isinstance(parts[0], Int4Linear) and (len({p.group_size for p in parts}) != 1 or
                                             any(p.out_features % INT4_PACK_ROWS for p in parts)):
        return None  # the int4 layout packs blocks of rows: stacking splits none only at block edges
    return FusedProjections(parts)


def fuse_projections(model: Gemma3Text) -> None:
    """Stack q/k/v and gate/up of every layer (see FusedProjections)."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.fused = _fusable(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp.fused = _fusable(mlp.gate_proj, mlp.up_proj)


class Int8Embedding(nn.Module):
    """Scaled Gemma embedding lookup from int8 rows (a model quantized in memory)."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(ACT_DTYPE))
        self.embed_scale = scale
        self.embedding_dim = q.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(ACT_DTYPE) * self.scales[ids][..., None]
        return rows * torch.tensor(self.embed_scale, dtype=ACT_DTYPE)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the embedding matrix (dtype/device probes)
        return self.scales


class CheckpointEmbedding(nn.Module):
    """Scaled Gemma embedding lookup that reads the rows it needs from the checkpoint file.

    A token needs one row of the 262k-row table, so reading it from the page cache beats holding 168 MB
    of int8 rows next to the packed LM head. Rows keep the file's own precision. The last `RECENT` rows
    used are kept, scaled (5 MB): text reuses a small vocabulary, and a row read and dequantized costs
    about 0.3 ms, a kept one microseconds.
    """

    RECENT = 4096

    def __init__(self, rows: LazyRows, scale: float):
        super().__init__()
        rows.hold()
        self.rows = rows
        self.embed_scale = scale
        self.embedding_dim = rows.shape[1]
        self.register_buffer("probe", torch.empty(0, dtype=ACT_DTYPE))
        self._recent: dict[int, torch.Tensor] = {}  # token id -> scaled row, oldest use first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        # Taken out and put back, so the most recently used rows sit at the end and the oldest go first.
        found = {i: self._recent.pop(i, None) for i in dict.fromkeys(flat)}
        missing = sorted(i for i, row in found.items() if row is None)
        if missing:  # gather refuses ids outside the table
            rows = self.rows.gather(torch.tensor(missing)).to(ACT_DTYPE)
            rows = rows * torch.tensor(self.embed_scale, dtype=ACT_DTYPE)
            found.update(zip(missing, rows.unbind()))
        self._recent.update(found)
        while len(self._recent) > self.RECENT:
            self._recent.pop(next(iter(self._recent)), None)
        out = torch.stack([found[i] for i in flat]).reshape(*ids.shape, self.embedding_dim)
        return out.to(ids.device)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the embedding matrix (dtype/device probes)
        return self.probe


INT4_MAX_STORED_BITS = 5.0  # int4 mode keeps int8 for tensors a GGUF stores with 5 or more bits


def _quantized(weight: torch.Tensor | LazyRows, mode: str, group_size: int,
               out_dtype: torch.dtype | None = None) -> nn.Module:
    """The fastest linear this CPU has for `weight` in `mode`.

    With the block kernel (engine/blocks.py, AVX2): in int4 mode a GGUF tensor the kernel reads (Q4_0,
    Q4_1, Q5_0, Q8_0, Q4_K, Q6_K) stays in the file as stored, so a Q4_K_M file keeps its 6-bit tensors'
    precision; other tensors become Q8_0 (a GGUF's other types) or Q4_1 (dense floats). In int8 mode
    everything is Q8_0, in place where the file holds Q8_0. On AVX-512 VNNI CPUs, int8 mode keeps that
    kernel's panels (engine/vnni.py). gguf mode keeps every tensor the kernel reads as stored, as int4
    mode does, and makes the others Q8_0.

    Without it, PyTorch's kernels: int8, or int4 unless the file stored this tensor with more bits than
    int4 can keep. Rounding those again to 4 bits costs far more than 4-bit quantization of a dense
    checkpoint: on the 270M, perplexity +17 % with its Q5_0 tensors int4 as well
    (benchmarks/quant_quality.py). The file's own 4-bit tensors (Q4_0, Q4_1, Q4_K) go to int4 with
    their codes as stored, at group size 32. Dense float sources are all int4.
    """
    if blocks.available() and not (mode == "int8" and vnni.fits(*weight.shape)):  # gguf mode: always blocks
        return _block_linear(weight, mode, out_dtype)
    if _int8(weight, mode, group_size):
        if out_dtype is not None and not vnni.fits(*weight.shape):
            return Int8HeadLinear(weight)
        return Int8Linear(weight, out_dtype=out_dtype)
    return Int4Linear(weight, group_size)


def _block_linear(weight: torch.Tensor | LazyRows, mode: str, out_dtype: torch.dtype | None) -> blocks.BlockLinear:
    out_f, in_f = weight.shape
    stored = getattr(weight, "ggml_type", None)
    if stored is not None and blocks.row_bytes(stored, in_f) is not None and (mode != "int8" or stored == blocks.Q8_0):
        return blocks.BlockLinear(weight.blocks(), stored, in_f, out_dtype)
    kind = blocks.Q4_1 if mode == "int4" and getattr(weight, "stored_bits", None) is None else blocks.Q8_0
    packed = torch.empty(out_f, blocks.row_bytes(kind, in_f), dtype=torch.uint8)
    for start, stop, rows in _row_chunks(weight):
        packed[start:stop] = blocks.quantize(rows, kind)
    return blocks.BlockLinear(packed, kind, in_f, out_dtype)


def _int8(weight: torch.Tensor | LazyRows, mode: str, group_size: int) -> bool:
    bits = getattr(weight, "stored_bits", None)
    exact = getattr(weight, "int4_group", None) == group_size
    return mode in ("int8", "gguf") or (bits is not None and bits >= INT4_MAX_STORED_BITS and not exact)


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise InputError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")


def _quantize_into(model: Gemma3Text, tensors: Mapping[str, torch.Tensor | LazyRows], mode: str,
                   group_size: int) -> Gemma3Text:
    """Quantized linears and embedding from `tensors`; every other weight (the norms) in bf16.

    RoPE frequencies stay float32: they are derived, not weights, and bf16 would shift the angles of
    far positions.
    """
    embedding = tensors["embed_tokens.weight"]
    head_weight = embedding if model.config.tie_word_embeddings else tensors["lm_head.weight"]
    # The head first: packing it briefly holds two copies, better before the layers are in memory too.
    model.lm_head = _quantized(head_weight, mode, group_size, out_dtype=torch.float32)
    scale = model.config.hidden_size**0.5
    lookup = isinstance(embedding, LazyRows)
    model.embed_tokens = CheckpointEmbedding(embedding, scale) if lookup else Int8Embedding(embedding, scale)
    for i, layer in enumerate(model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    weight = tensors[f"layers.{i}.{parent_name}.{name}.weight"]
                    setattr(parent, name, _quantized(weight, mode, group_size))
    rest = {name: param for name, param in model.named_parameters()}  # what is still dense: the norms
    model.load_state_dict({name: tensors[name][:].to(ACT_DTYPE) for name in rest}, strict=False, assign=True)
    fuse_projections(model)
    model.quantization = mode
    return model


def quantize_text_model(model: Gemma3Text, mode: str, group_size: int = 32) -> Gemma3Text:
    """Replace every decoder linear and the tied embedding/LM head of a loaded model, in place."""
    _check_mode(mode)
    if mode == "none":
        return model
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return _quantize_into(model, tensors, mode, group_size)


def load_quantized_text_model(cfg: TextConfig, tensors: Mapping[str, LazyRows], mode: str, source: str,
                              group_size: int = 32) -> Gemma3Text:
    """A quantized model straight from checkpoint tensors read a slice of rows at a time.

    Peak memory is the quantized model plus one slice, never a dense float32 copy (for the 270M:
    about 0.3 GB instead of 1.1 GB of weights).
    """
    _check_mode(mode)
    if mode == "none":
        raise InputError("load_quantized_text_model needs int8, int4 or gguf; load dense models with load_text_model")
    with torch.device("meta"):
        model = Gemma3Text(cfg)
    check_state_dict(model, {name: t.meta() for name, t in tensors.items()}, source)
    _quantize_into(model, tensors, mode, group_size)
    model.finish_init()
    return model.eval()


@torch.inference_mode()
def greedy_agreement(model: nn.Module, sequences: list[list[int]], prompt_lens: list[int]) -> float:
    """Share of a reference's greedy tokens that `model` also picks when fed the same prefix.

    Teacher-forced, so one early disagreement does not turn every later token into a mismatch the
    way comparing two free-running generations does.
    """
    agree = total = 0
    for seq, start in zip(sequences, prompt_lens, strict=True):
        if len(seq) <= start:
            continue
        logits = model(torch.tensor([seq]))[0, start - 1:-1]
        agree += int((logits.argmax(-1) == torch.tensor(seq[start:])).sum())
        total += len(seq) - start
    return agree / max(total, 1)
