"""Small random models for the scheduler and speculative-decoding tests.

Embeddings are untied: a random model with a tied head mostly repeats its input token, and a test
of batching needs varied text. Text is decoded as "t<id>" words, since no real tokenizer fits a
512-token random vocabulary (tests on the real 270M use its real tokenizer).
"""

from __future__ import annotations

import pytest
import torch

from medgem.config import MultimodalConfig, tiny_text_config, tiny_vision_config
from medgem.engine.generate import Generator
from medgem.nn.medgemma import Gemma3Multimodal
from medgem.nn.text import Gemma3Text

STOP_ID = 1
IMAGE_ID = 512  # one past the tiny text vocabulary, as with the GGUF text models


def words(ids: list[int]) -> str:
    return "".join(f" t{i}" for i in ids)


def random_text_model(seed: int, **overrides) -> Gemma3Text:
    torch.manual_seed(seed)
    return Gemma3Text(tiny_text_config(tie_word_embeddings=False, **overrides)).eval()


def generator_for(model: torch.nn.Module) -> Generator:
    config = getattr(model, "text_config", None) or model.config
    return Generator(model, config, words, stop_ids=(STOP_ID,))


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def make_prompts():
    """prompts(lengths, seed=1): random token ids, never the stop id."""
    return random_prompts


@pytest.fixture(scope="session")
def make_text_generator():
    """make(seed, **TextConfig overrides) -> a Generator around a fresh random text model."""
    return lambda seed, **overrides: generator_for(random_text_model(seed, **overrides))


@pytest.fixture
def single_thread(request):
    """One torch thread for tiny models: their kernels are too small to split, and on a loaded machine
    the idle OpenMP workers make each call ~20x slower. Tests on real weights keep every thread."""
    if "real_pipe" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_target() -> Generator:
    """7 layers (6 sliding with a window of 8, 1 global), GQA."""
    return generator_for(random_text_model(0))


@pytest.fixture(scope="session")
def tiny_multimodal() -> Generator:
    torch.manual_seed(3)
    cfg = MultimodalConfig(text=tiny_text_config(tie_word_embeddings=False), vision=tiny_vision_config(),
                           mm_tokens_per_image=4, image_token_id=IMAGE_ID, boi_token_id=500, eoi_token_id=501)
    model = Gemma3Multimodal(cfg).eval()
    with torch.no_grad():
        model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    return generator_for(model)


@pytest.fixture
def pytorch_kernels(monkeypatch):
    """Models quantized while this fixture is active use PyTorch's int8/int4 kernels, as on a CPU without
    AVX2 or a C compiler, so the fallback stays tested on machines that have the block kernel."""
    from medgem.engine import blocks

    monkeypatch.setattr(blocks, "available", lambda: False)
