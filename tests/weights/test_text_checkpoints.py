"""Every HF key layout loads to the same model; broken checkpoints give errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from medgem.errors import CheckpointError
from medgem.weights import load_text_model

LAYOUTS = {
    "published multimodal": lambda k: k.replace("model.", "language_model.model.", 1),
    "transformers 4.52+/5.x multimodal": lambda k: k.replace("model.", "model.language_model.", 1),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4,
    )
    folder = tmp_path_factory.mktemp("ckpt") / "plain"
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    ours, _ = load_text_model(folder, "float32")
    ids = torch.arange(1, 12)[None]
    with torch.no_grad():
        logits = ours(ids)
    return folder, ids, logits


def rewrite(folder, dest, rename=None, drop=None, change=None):
    """A copy of the checkpoint with keys renamed/dropped/reshaped."""
    shutil.copytree(folder, dest)
    path = dest / "model.safetensors"
    state = load_file(path)
    if drop:
        state.pop(drop)
    if change:
        state[change] = torch.zeros(3, 3)
    if rename:
        state = {rename(k): v for k, v in state.items()}
    save_file(state, path)
    return dest


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_multimodal_layouts_load_text(checkpoint, tmp_path, layout):
    folder, ids, expected = checkpoint
    dest = rewrite(folder, tmp_path / "x", rename=LAYOUTS[layout])
    state = load_file(dest / "model.safetensors")
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)  # vision keys are not text
    save_file(state, dest / "model.safetensors")
    model, _ = load_text_model(dest, "float32")
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


def test_sharded_index(checkpoint, tmp_path):
    folder, ids, expected = checkpoint
    dest = tmp_path / "sharded"
    dest.mkdir()
    shutil.copy(folder / "config.json", dest)
    state = load_file(folder / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, dest / name)
        weight_map.update(dict.fromkeys(part, name))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_text_model(dest, "float32")
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    (dest / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002"):
        load_text_model(dest, "float32")


def test_bfloat16(checkpoint):
    folder, ids, expected = checkpoint
    model, _ = load_text_model(folder, "bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 0.1


def test_missing_tensor_is_named(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    dest = rewrite(folder, tmp_path / "m", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"lacks tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_text_model(dest, "float32")


def test_misshaped_tensor_is_named(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    dest = rewrite(folder, tmp_path / "s", change="model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(CheckpointError, match=r"'layers\.0\.self_attn\.q_proj\.weight' has shape \(3, 3\)"):
        load_text_model(dest, "float32")


def test_extra_tensor_is_named(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    dest = rewrite(folder, tmp_path / "e")
    state = load_file(dest / "model.safetensors")
    state["model.layers.5.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(state, dest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.5\.mlp\.up_proj\.weight'"):
        load_text_model(dest, "float32")


def test_config_weights_mismatch(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    dest = rewrite(folder, tmp_path / "c")
    cfg = json.loads((dest / "config.json").read_text())
    cfg["hidden_size"] = 48
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config expects"):
        load_text_model(dest, "float32")


def test_truncated_safetensors(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    dest = rewrite(folder, tmp_path / "t")
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_text_model(dest, "float32")


def test_truncated_gguf(embedded_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(embedded_gguf, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_text_model(bad, "float32")


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="model not found"):
        load_text_model(tmp_path / "nope", "float32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_text_model(tmp_path / "empty", "float32")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="must be .gguf"):
        load_text_model(tmp_path / "weights.bin", "float32")
