"""Our one-pass GGUF header parser against the gguf package's reader, on the real embedded file."""

from __future__ import annotations

import pytest

from medgem.errors import CheckpointError
from medgem.weights.gguf_reader import read_header


def test_header_equals_the_gguf_readers_fields_and_tensors(tmp_path):
    """Every value type, string arrays, an odd alignment and quantized tensors, written by gguf's own writer.
    (The real 262k vocabulary takes gguf's reader 40 s, which is why the parser exists.)"""
    import gguf
    import numpy as np

    path = tmp_path / "every-type.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_uint8("t.u8", 200), writer.add_int8("t.i8", -5), writer.add_uint16("t.u16", 60_000)
    writer.add_int16("t.i16", -300), writer.add_uint32("t.u32", 4_000_000_000), writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.25), writer.add_bool("t.bool", True), writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40)), writer.add_float64("t.f64", 1e-300), writer.add_string("t.str", "Kalium µmol")
    writer.add_array("t.strings", ["<pad>", "▁the", "ü", ""]), writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.5]), writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    writer.add_tensor("a", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("b", rng.standard_normal((5, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()

    header, reader = read_header(path), gguf.GGUFReader(path)
    assert header.fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.fields["t.strings"] == ["<pad>", "▁the", "ü", ""] and header.fields["t.u64"] == 2**40
    assert header.tensors == [(t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset),
                               int(t.n_bytes)) for t in reader.tensors]


def test_the_real_vocabulary_is_read(embedded_gguf):
    fields = read_header(embedded_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(fields["tokenizer.ggml.token_type"]) == 262_144
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<bos>" and tokens[105:107] == ["<start_of_turn>", "<end_of_turn>"]


@pytest.mark.parametrize("cut", [3, 30, 2_000, 5_000_000])
def test_a_cut_header_is_a_clear_error(embedded_gguf, tmp_path, cut):
    broken = tmp_path / "cut.gguf"
    with open(embedded_gguf, "rb") as src:
        broken.write_bytes(src.read(cut))
    with pytest.raises(CheckpointError, match="cut.gguf .*(truncated|corrupt)"):
        read_header(broken)


def test_a_hostile_length_is_refused_without_allocating(tmp_path):
    """A string length of 2^63 in the first key: refused by the file-size check, not attempted."""
    import struct

    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + b"x" * 64)
    with pytest.raises(CheckpointError, match="hostile.gguf"):
        read_header(path)
