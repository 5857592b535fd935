"""The SigLIP dual encoder against transformers' SiglipModel (random weights, fp32), loaded through
medgem.load_siglip from folders that transformers itself saved; tokenizer, image processor, loss and
checkpoint errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medgem
from medgem.errors import CheckpointError, InputError
from medgem.nn.siglip import MEDSIGLIP_448, sigmoid_loss
from medgem.weights.siglip import save_siglip

WORDS = (
    "a", "an", "the", "of", "with", "and", "no", "left", "right", "chest", "lung", "ct", "mri", "x", "ray", "scan",
    "nodule", "lesion", "fracture", "normal", "image", "medical",
)


def train_spiece(folder: Path, vocab_size: int = 200) -> None:
    """A small SentencePiece model laid out like SigLIP's (pad 0, </s> 1, unk 2, no bos)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=vocab_size, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False,
    )
    (folder / "spiece.vocab").unlink()


def hf_checkpoint(folder: Path, text: dict, vision: dict):
    """A random transformers SiglipModel saved with its tokenizer. Every tensor is drawn here (scaled
    by fan-in; norms around 0.5, so their affine part is checked): faster than transformers' own init."""
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
    from transformers.initialization import no_init_weights

    folder.mkdir()
    train_spiece(folder)
    tokenizer = SiglipTokenizer(str(folder / "spiece.model"), model_max_length=text["max_position_embeddings"])
    torch.manual_seed(0)
    with no_init_weights():
        ref = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(0.5, 0.3)
            else:
                p.normal_(0.0, 0.3 if p.ndim == 1 or "logit" in name else p[0].numel() ** -0.5)
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ref, tokenizer


TINY_TEXT = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=7)


def medsiglip_2_layers() -> tuple[dict, dict]:
    text = {k: v for k, v in vars(MEDSIGLIP_448.text).items() if k not in ("pad_token_id", "eos_token_id")}
    vision = {k: v for k, v in vars(MEDSIGLIP_448.vision).items()}
    text.update(num_hidden_layers=2, vocab_size=200)  # the spiece model of the test has 200 pieces
    vision.update(num_hidden_layers=2)
    return text, vision


TEXTS = ["Chest X-ray: left lung nodule.", "normal", "", "a CT scan of the chest with no fracture " * 8]


def test_tokenizer_matches_transformers(tmp_path):
    _, hf_tokenizer = hf_checkpoint(tmp_path / "ckpt", TINY_TEXT, TINY_VISION)
    enc = medgem.load_siglip(tmp_path / "ckpt")
    texts = [*TEXTS, "  MRI\tbrain,  T2!! ", "zzqx unknownword", "a \u2581 odd", "it's 5 mm"]
    expected = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(enc.tokenizer(texts), expected["input_ids"])
    assert enc.tokenizer(["x"]).shape == (1, 16)


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["tiny", "medsiglip-448-2-layers"])
def test_parity_with_transformers(tmp_path, shapes):
    text, vision = (TINY_TEXT, TINY_VISION) if shapes == "tiny" else medsiglip_2_layers()
    ref, hf_tokenizer = hf_checkpoint(tmp_path / "ckpt", text, vision)
    enc = medgem.load_siglip(tmp_path / "ckpt")
    assert enc.dim == vision["hidden_size"]

    texts = [TEXTS[0], TEXTS[3]]  # one short, one cut at the text length
    ids = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=text["max_position_embeddings"],
                       return_tensors="pt")["input_ids"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (s, s + 7, 3), dtype=np.uint8)) for s in (40, 90)]
    pixels = enc.pixels(images)
    assert pixels.shape == (2, 3, vision["image_size"], vision["image_size"])
    with torch.no_grad():  # no attention mask: SigLIP runs on texts padded to full length
        out = ref(input_ids=ids, pixel_values=pixels, return_loss=True)
    got_images, got_texts = enc.embed_images(images), enc.embed_texts(texts)
    np.testing.assert_allclose(got_images, out.image_embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_texts, out.text_embeds.numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        logits = enc.model.logits(torch.from_numpy(got_images), torch.from_numpy(got_texts))
    np.testing.assert_allclose(logits.numpy(), out.logits_per_image.numpy(), atol=1e-4, rtol=1e-5)
    assert abs(sigmoid_loss(logits.T).item() - out.loss.item()) < 1e-4  # transformers sums over each text row


def test_image_processor_matches_transformers(tmp_path):
    """Bicubic resize to the tower's size and [-1, 1] scaling, as SiglipImageProcessor does it."""
    from transformers import SiglipImageProcessor

    ref, _ = hf_checkpoint(tmp_path / "ckpt", TINY_TEXT, TINY_VISION)
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path / "ckpt")
    enc = medgem.load_siglip(tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    expected = SiglipImageProcessor(size={"height": 28, "width": 28})(image, return_tensors="pt")["pixel_values"]
    assert (enc.pixels([image]) - expected).abs().max().item() < 1e-5


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    from transformers import SiglipModel

    hf_checkpoint(tmp_path / "ckpt", TINY_TEXT, TINY_VISION)
    enc = medgem.load_siglip(tmp_path / "ckpt")
    save_siglip(enc.model, tmp_path / "again", side_files_from=tmp_path / "ckpt")
    again = SiglipModel.from_pretrained(tmp_path / "again").eval()
    ids = enc.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.allclose(again.get_text_features(input_ids=ids).pooler_output, enc.model.text_model(ids), atol=1e-6)
    assert medgem.load_siglip(tmp_path / "again").fingerprint == enc.fingerprint
    probs = enc.zero_shot([Image.new("RGB", (40, 30), "gray")] * 2, ["lung nodule", "fracture", "normal"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_sigmoid_loss_prefers_matched_pairs():
    matched = torch.eye(4) * 10 - 5
    assert sigmoid_loss(matched) < sigmoid_loss(-matched)
    with pytest.raises(InputError):
        sigmoid_loss(torch.zeros(2, 3))


def test_checkpoint_errors(tmp_path):
    hf_checkpoint(tmp_path / "ckpt", TINY_TEXT, TINY_VISION)
    with pytest.raises(CheckpointError, match="not found"):
        medgem.load_siglip(tmp_path / "nowhere")
    broken = tmp_path / "ckpt"
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["projection_size"] = 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="projection_size"):
        medgem.load_siglip(broken)
    config["text_config"]["projection_size"] = 32
    config["text_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks tensor 'text_model.encoder.layers.2"):
        medgem.load_siglip(broken)
    config["text_config"]["num_hidden_layers"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match="spiece.model"):
        medgem.load_siglip(broken)


def test_zero_shot_input_errors(tmp_path):
    hf_checkpoint(tmp_path / "ckpt", TINY_TEXT, TINY_VISION)
    enc = medgem.load_siglip(tmp_path / "ckpt")
    image = Image.new("RGB", (30, 30), "white")
    with pytest.raises(InputError, match="two non-empty labels"):
        enc.zero_shot([image], ["only one"])
    with pytest.raises(InputError, match="template"):
        enc.zero_shot([image], ["a", "b"], template="no slot")
    with pytest.raises(InputError, match="no such file"):
        enc.embed_images([tmp_path / "missing.png"])
    assert enc.zero_shot([image], ["a"], multilabel=True).shape == (1, 1)
