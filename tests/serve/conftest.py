"""Fixtures for the server tests: real uvicorn servers on loopback, the real embedded model, and a
random-weight multimodal MedGemma checkpoint (Gemma's real vocabulary, a tiny text and vision tower)
written by transformers, so images and DICOM travel the whole path quickly."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn
from pydicom.data import get_testdata_file

from medgem.serve.app import create_app
from medgem.serve.settings import Limits, ServeSettings

# Small caches and bounded answers keep every test quick.
TEST_LIMITS = Limits(max_prompt_tokens=1024, max_tokens=64, default_max_tokens=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(pipe, settings: ServeSettings | None = None, embedder=None, prepare=None) -> Iterator[str]:
    """`create_app(settings, pipe, embedder)` served by uvicorn in a thread; yields its base URL.
    `prepare(app)` may add routes first (the error-boundary tests add one with a real bug)."""
    settings = replace(settings or ServeSettings(limits=TEST_LIMITS), port=_free_port())
    app = create_app(settings, pipe, embedder)
    if prepare is not None:
        prepare(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _data_url(path_or_bytes, media_type: str) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def data_url():
    """data_url(path or bytes, media type) -> a base64 data: URI."""
    return _data_url


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> an unused loopback port."""
    return _free_port


@pytest.fixture(scope="session")
def serve():
    """serve(pipe, settings=None, embedder=None): a context manager running a real server; yields its URL."""
    return running


@pytest.fixture(scope="session")
def chest_dicom() -> str:
    """The RG1_UNCR chest radiograph (CR, 1955x1841, MONOCHROME1) from pydicom-data."""
    return get_testdata_file("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_medgemma):
    import medgem

    return medgem.load(tiny_medgemma, dtype="float32")


@pytest.fixture(scope="module")
def text_server(real_pipe) -> Iterator[str]:
    """The embedded Gemma 3 270M behind a real server."""
    with running(real_pipe) as url:
        yield url


@pytest.fixture(scope="module")
def vision_server(tiny_pipe) -> Iterator[str]:
    """The tiny multimodal model behind a real server, with a small image limit for the limit tests."""
    with running(tiny_pipe, ServeSettings(model_name="medgemma-tiny", limits=replace(TEST_LIMITS, max_images=3))) as url:
        yield url
