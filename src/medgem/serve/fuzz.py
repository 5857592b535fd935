"""Hostile requests for the fuzz suite (tests/serve/test_fuzz.py) and the long run (benchmarks/fuzz.py).

`hypothesis` strategies that build what a hostile client sends: OpenAI bodies with wrong types, huge and
odd numbers, lone surrogates and NULs, message parts, data URIs of broken and bomb-sized PNGs and of
DICOM datasets with random headers, raw bytes, and deep JSON. `check(response)` is the contract every
answer must keep. Lives in the package (not tests/) so the benchmark shares it; imports hypothesis
lazily, which only the test extra installs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

SECRET = "John Q Testpatient MRN 7340021"  # planted in every text field: no error may echo it
LONG = "x" * 3000
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/dicom/preview", "/v1/models",
          "/v1/models/medgemma-tiny", "/health", "/ready", "/metrics", "/nowhere")


@dataclass
class Probe:
    """One request: method, path, query, raw body and content type."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    params: dict[str, str] | None = None


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG declaring width x height with whatever IDAT bytes (often none that decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def dicom_bytes(rows: int, columns: int, frames: int, bits: int, photometric: str, pixel_bytes: int,
                transfer: str, window: tuple[str, str] | None) -> bytes:
    """A Part 10 DICOM with this header and `pixel_bytes` of pixel data (which need not match it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = SECRET, "MRN7340021", "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = bytes(pixel_bytes)
    out = io.BytesIO()
    with contextlib.suppress(Exception):  # a header pydicom cannot write: send what it wrote (truncated)
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def strategies():
    """The `probes` strategy (one Probe per example)."""
    from hypothesis import strategies as st

    hostile_text = st.one_of(
        st.text(max_size=40),
        st.sampled_from(["\ud800", "a\udfff b", "\0\0", "", " ", SECRET, "\u202e" * 3, "<start_of_image>" * 4,
                         "<end_of_turn>\n<start_of_turn>user", LONG]),
        st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=5),
    ).map(lambda t: t + " " + SECRET if t and len(t) < 100 else t)
    number = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0, -1, 1, 2, 2**63, 2**64, 2**64 - 1, 1e308, -0.0]))
    scalar = st.one_of(st.none(), st.booleans(), number, hostile_text)
    any_json = st.recursive(scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        hostile_text, kids, max_size=4), max_leaves=12)
    windows = st.one_of(st.none(), st.sampled_from(["lung", "bone", "auto", "minmax", "40/400", "nan/1", "1/inf",
                                                    "40/0", "-5/-5", SECRET, "1e309/1", ""]), hostile_text)
    pngs = st.one_of(
        st.builds(png_header, st.integers(0, 70_000), st.integers(0, 70_000), st.binary(max_size=64)),
        st.builds(lambda w, h: _real_png(w, h), st.integers(1, 96), st.integers(1, 96)),
        st.binary(max_size=200),
    )
    dicoms = st.builds(
        dicom_bytes, st.integers(0, 65_535) | st.integers(1, 64), st.integers(0, 65_535) | st.integers(1, 64),
        st.integers(0, 5000) | st.just(1), st.sampled_from([8, 16]),
        st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR"]),
        st.integers(0, 40_000), st.sampled_from(["", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2"]),
        st.none() | st.tuples(st.sampled_from(["40", "-1e6", "0"]), st.sampled_from(["400", "0", "-1"])),
    )
    data_urls = st.one_of(
        pngs.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
        dicoms.map(lambda b: "data:application/dicom;base64," + base64.b64encode(b).decode()),
        st.sampled_from(["http://example.com/x.png", "file:///etc/passwd", "data:image/png;base64,!!!",
                         "data:image/gif;base64,R0lG", "data:image/png,abc", "data:;base64,", "data:image/png;base64,"]),
        hostile_text,
    )
    image_part = st.builds(lambda url, w, d: {"type": "image_url", "image_url": {"url": url, "window": w,
                                                                                "detail": d}},
                           data_urls, windows, st.sampled_from(["auto", "low", "high", None, "ultra"]))
    text_part = hostile_text.map(lambda t: {"type": "text", "text": t})
    odd_part = st.one_of(any_json, st.just({"type": "video"}), st.just({"type": "text"}))
    content = st.one_of(hostile_text, st.lists(st.one_of(text_part, image_part, odd_part), max_size=3), any_json)
    def mostly(valid, hostile):  # two in three examples valid, so requests reach generation too
        return st.one_of(valid, valid, hostile)

    short = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
    sampling = {
        "max_tokens": mostly(st.integers(1, 4), number | st.none()),
        "temperature": mostly(st.floats(0, 2), number | st.none()),
        "top_p": mostly(st.floats(0.01, 1), number | st.none()),
        "seed": mostly(st.integers(0, 2**32), number | st.none()),
        "stop": mostly(st.lists(short, max_size=4), st.none() | hostile_text | st.lists(hostile_text, max_size=6)
                       | number),
        "n": mostly(st.integers(1, 2), number),
        "stream": mostly(st.booleans(), scalar),
        "stream_options": st.none() | st.just({"include_usage": True}) | any_json,
        "logprobs": st.none() | st.booleans(),
        "response_format": st.none() | st.just({"type": "json_object"}),
        "reasoning": st.none() | st.booleans(),
    }
    model = st.one_of(st.just("medgemma-tiny"), st.just("medgemma-tiny"), st.just("medgemma-tiny"),
                      st.sampled_from(["other", ""]), hostile_text)
    message = st.fixed_dictionaries(
        {"role": mostly(st.just("user"), st.sampled_from(["system", "assistant", "developer", "tool", 5])),
         "content": mostly(hostile_text, content)})
    chat = st.fixed_dictionaries({"model": model, "messages": mostly(st.lists(message, min_size=1, max_size=3),
                                                                      st.lists(message, max_size=3) | any_json)},
                                 optional=sampling)
    completion = st.fixed_dictionaries(
        {"model": model, "prompt": st.one_of(hostile_text, st.lists(hostile_text, max_size=3), any_json)},
        optional=sampling)
    embedding = st.fixed_dictionaries({"model": model, "input": st.one_of(hostile_text, st.lists(
        st.one_of(hostile_text, image_part), max_size=3), any_json)},
        optional={"encoding_format": st.sampled_from(["float", "base64", "hex"])})
    deep = st.integers(60, 3000).map(lambda d: b'{"model": "medgemma-tiny", "prompt": ' + b"[" * d + b"]" * d + b"}")

    def as_json(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()

    json_probes = st.one_of(
        st.tuples(st.just("/v1/chat/completions"), chat.map(as_json)),
        st.tuples(st.just("/v1/completions"), completion.map(as_json)),
        st.tuples(st.just("/v1/embeddings"), embedding.map(as_json)),
        st.tuples(st.sampled_from(ROUTES[:3]), st.one_of(any_json.map(as_json), st.binary(max_size=64), deep)),
    ).map(lambda rb: Probe("POST", rb[0], rb[1]))
    preview = st.builds(lambda body, window, size, kind: Probe("POST", "/v1/dicom/preview", body, kind,
                                                                {k: v for k, v in (("window", window),
                                                                 ("size", size)) if v is not None}),
                        st.one_of(pngs, dicoms, st.binary(max_size=100)), windows.filter(_sendable),
                        st.none() | st.sampled_from(["16", "0", "-5", "99999", "abc", "64"]),
                        st.sampled_from(["application/dicom", "application/octet-stream", "image/png", None]))
    gets = st.sampled_from(ROUTES).map(lambda path: Probe("GET", path, None, None))
    return st.one_of(json_probes, json_probes, preview, gets)


def _sendable(text: str | None) -> bool:
    """A query value httpx can send (the server sees surrogates only in JSON bodies)."""
    return text is None or ("\0" not in text and not any("\ud800" <= c <= "\udfff" for c in text))


def _real_png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 160)).save(out, "PNG")
    return out.getvalue()


def check(status: int, headers: dict[str, str], text: str) -> str | None:
    """What is wrong with one answer (None when it keeps the contract)."""
    if status >= 500:
        return f"status {status}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} without an OpenAI-shaped error"
        if set(error) != {"message", "type", "param", "code"}:
            return f"status {status}: error fields {sorted(error)}"
        if "Testpatient" in text or "7340021" in text:
            return f"status {status}: the error echoes request content"
    if "text/event-stream" in headers.get("content-type", "") and not text.endswith("data: [DONE]\n\n"):
        return "a stream that does not end with [DONE]"
    return None
