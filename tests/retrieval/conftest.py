"""Fixtures for the SigLIP jobs: a synthetic textures-and-captions set, a tiny dual encoder trained on it
with medgem's contrastive trainer (no SigLIP weights ship offline), and a folder of real medical images
(pydicom-data / pydicom DICOMs, scikit-image retina, IHC and cell photos)."""

from __future__ import annotations

import csv
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

PATTERNS = ("horizontal stripes", "vertical stripes", "checkerboard")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
DICOMS = ("RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm")
PHOTOS = ("retina", "immunohistochemistry", "cell", "microaneurysms")

TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


@contextmanager
def one_thread():
    """Tiny models run many times faster on one torch thread than on two of a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def draw_pattern(pattern: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One texture in one colour over a random dark background, random period and phase."""
    background = np.array([rng.randint(0, 60) for _ in range(3)], np.uint8)
    fill = np.array([min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour]], np.uint8)
    period, phase = rng.randint(10, 18), rng.randint(0, 17)
    y, x = np.mgrid[:size, :size] + phase
    on = {
        "horizontal stripes": (y // (period // 2)) % 2 == 0,
        "vertical stripes": (x // (period // 2)) % 2 == 0,
        "checkerboard": ((x // (period // 2)) + (y // (period // 2))) % 2 == 0,
    }[pattern]
    return Image.fromarray(np.where(on[..., None], fill, background))


def write_patterns(folder: Path, count: int, seed: int) -> list[tuple[Path, str, str]]:
    """PNG files with (path, pattern, colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        pattern, colour = PATTERNS[i % len(PATTERNS)], rng.choice(list(COLOURS))
        path = folder / f"{i:04d}.png"
        draw_pattern(pattern, colour, rng).save(path)
        out.append((path, pattern, colour))
    return out


def train_spiece(folder: Path, lines: list[str], vocab_size: int) -> None:
    """A SentencePiece model laid out like SigLIP's (pad 0, </s> 1, unk 2, no bos)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=vocab_size, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False,
    )
    (folder / "spiece.vocab").unlink()


def random_checkpoint(folder: Path, captions: list[str]) -> Path:
    """A freshly initialised tiny SiglipModel saved by transformers (test-only), with the paper's
    starting temperature and bias (logit_scale = log 10, logit_bias = -5 for small batches)."""
    from transformers import SiglipConfig, SiglipModel

    folder.mkdir(parents=True)
    train_spiece(folder, captions, TEXT["vocab_size"])
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10.0)))
        model.logit_bias.fill_(-5.0)
    model.save_pretrained(folder)
    return folder


def caption(pattern: str, colour: str, rng: random.Random) -> str:
    return rng.choice([f"{colour} {pattern}", f"{pattern} in {colour}", f"a {colour} texture of {pattern}"])


@pytest.fixture(scope="session")
def patterns_data(tmp_path_factory) -> Path:
    """train.csv (image, caption) over 300 generated texture images."""
    root = tmp_path_factory.mktemp("patterns")
    rng = random.Random(1)
    rows = [(p.name, caption(s, c, rng)) for p, s, c in write_patterns(root, 300, seed=0)]
    with (root / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def untrained_siglip(tmp_path_factory, patterns_data) -> Path:
    with (patterns_data / "train.csv").open() as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    return random_checkpoint(tmp_path_factory.mktemp("untrained") / "model", captions * 5)


@pytest.fixture(scope="session")
def trained_siglip(tmp_path_factory, patterns_data, untrained_siglip) -> Path:
    """The tiny dual encoder after 300 steps of medgem's contrastive trainer on the textures set (about 25 s
    on one thread; torch's two threads are many times slower on a loaded 2-core machine)."""
    from medgem.train.contrastive import ContrastiveConfig, train_contrastive

    cfg = ContrastiveConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=20, save_every=100)
    with one_thread():
        return train_contrastive(untrained_siglip, patterns_data / "train.csv", tmp_path_factory.mktemp("trained"),
                                 cfg, progress=False)


@pytest.fixture(scope="session")
def retrieval_siglip(tmp_path_factory, untrained_siglip) -> Path:
    """The encoder of the retrieval tests: transformers' default random init at 64 px (patch 8, width 128).
    No weights ship offline, and the 32 px texture model above blurs grey CT/MR slices together; random
    ViT features at 64 px still tell the real images apart and survive a mild crop and brightness change
    (a stronger one, 85% crop and +15% brightness, moves CT_small's random features too far: measured)."""
    from transformers import SiglipConfig, SiglipModel

    folder = tmp_path_factory.mktemp("retrieval") / "model"
    torch.manual_seed(0)
    text = dict(TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    vision = dict(VISION, hidden_size=128, intermediate_size=256, image_size=64)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    shutil.copy(untrained_siglip / "spiece.model", folder)
    return folder


@pytest.fixture(scope="session")
def medical_images(tmp_path_factory) -> Path:
    """Real DICOMs (CR chest and extremity, CT, MR) and real photos (fundus, IHC, cells) in one folder."""
    import skimage.data
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("medical")
    for name in DICOMS:
        path = get_testdata_file(name)
        assert path, f"{name} is not in pydicom's test data"
        shutil.copy(path, root / (Path(name).stem + ".dcm"))
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(root / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def make_patterns():
    """Factory: make_patterns(folder, count, seed) -> [(path, pattern, colour)] of new generated PNGs."""
    return write_patterns


@pytest.fixture(scope="session")
def labels() -> dict[str, tuple[str, ...]]:
    return {"pattern": PATTERNS, "colour": tuple(COLOURS)}
