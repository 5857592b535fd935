"""Fixtures for fine-tuning tests: tiny random checkpoints with Gemma's real tokenizer, written by our
own HF exporter (so every test that loads them also exercises the export), and small data sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgem.config import MultimodalConfig, tiny_text_config, tiny_vision_config
from medgem.nn.medgemma import Gemma3Multimodal
from medgem.nn.text import Gemma3Text
from medgem.processing.images import ImageProcessor
from medgem.weights.export import export_hf

VOCAB = 262_144  # Gemma's tokenizer, so data is real text; the LM head only runs at label positions
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}


def tiny_text(seed: int = 0) -> Gemma3Text:
    torch.manual_seed(seed)
    model = Gemma3Text(tiny_text_config(vocab_size=VOCAB, num_hidden_layers=4, sliding_window=32,
                                        max_position_embeddings=4096))
    with torch.no_grad():  # RMSNorm weights start at zero (scale 1): randomise them so norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
        model.embed_tokens.weight.normal_(0, 0.05)  # logits of order one, so absolute tolerances mean something
    return model.eval()


def tiny_multimodal(seed: int = 0) -> Gemma3Multimodal:
    torch.manual_seed(seed)
    text = tiny_text_config(vocab_size=VOCAB, num_hidden_layers=4, sliding_window=32, max_position_embeddings=4096)
    model = Gemma3Multimodal(MultimodalConfig(text=text, vision=tiny_vision_config(), mm_tokens_per_image=4))
    model.finish_init()
    with torch.no_grad():  # the projector starts at zero (no image signal at all): randomise it and the norms
        for name, p in model.named_parameters():
            if "norm" in name or "projector" in name:
                p.normal_(0, 0.3)
        model.language_model.embed_tokens.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, embedded_gguf) -> Path:
    """A random 4-layer text model with the real vocabulary (tokenizer rebuilt from the embedded GGUF)."""
    return export_hf(tiny_text(), tmp_path_factory.mktemp("tiny") / "text", embedded_gguf)


@pytest.fixture(scope="session")
def tiny_mm_dir(tmp_path_factory, tiny_text_dir) -> Path:
    """A random multimodal model (28 px images, 4 soft tokens each) with the same tokenizer files."""
    return export_hf(tiny_multimodal(), tmp_path_factory.mktemp("tiny") / "multimodal", tiny_text_dir,
                     image_processor=ImageProcessor(size=28))


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 9, 2))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a + b}"}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def arithmetic_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))


def colour_image(path: Path, colour: str, rng: np.random.Generator) -> Path:
    """A 28 px image: a noisy background with a square of the colour at a random place and size."""
    pixels = rng.integers(90, 160, (28, 28, 3)).astype(np.uint8)
    side = int(rng.integers(12, 22))
    y, x = (int(v) for v in rng.integers(0, 28 - side, 2))
    pixels[y:y + side, x:x + side] = COLOURS[colour]
    Image.fromarray(pixels).save(path)
    return path


def colour_rows(folder: Path, n: int, seed: int) -> list[dict]:
    """Image questions whose one-word answer is the colour of the square; image paths are relative to
    the parent of `folder` (where the JSONL goes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        image = colour_image(folder / f"{seed}-{i}.png", colour, rng)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{folder.name}/{image.name}"},
                                         {"type": "text", "text": "What colour is the square?"}]},
            {"role": "assistant", "content": colour}]})
    return rows


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    """`medgem ARGS` in a fresh process with one thread, so every run does identical arithmetic."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-c", "import sys; from medgem.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
