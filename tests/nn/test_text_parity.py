"""Parity of our Gemma 3 decoder with transformers' Gemma3ForCausalLM on random weights.

The reference saves the checkpoint itself (transformers 5.x config format); a copy is rewritten in the
4.5x format (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`). Both must
load into our model and give the same logits, for a full forward and for token-by-token decoding
through our KV cache far past the sliding window.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medgem.config import from_hf_config
from medgem.engine.cache import KVCache
from medgem.weights import load_text_model

TOL = 1e-4
WINDOW = 8
SEQ = 3 * WINDOW + 9  # decode runs > 3x past the window


def reference_config(**overrides):
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        max_position_embeddings=256, rope_theta=10_000.0, rope_local_base_freq=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


def save_reference(tmp_path, name, **overrides):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    ref = Gemma3ForCausalLM(reference_config(**overrides)).eval()
    with torch.no_grad():  # norms start at zero in the reference; randomise so (1 + w) is exercised
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    folder = tmp_path / name
    ref.save_pretrained(folder)
    return ref, folder


def as_old_format(folder, dest):
    """The same checkpoint with a transformers 4.5x config.json."""
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    cfg["sliding_window_pattern"] = 6
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("ref"), "plain")


def test_config_both_formats_agree(reference, tmp_path):
    _, folder = reference
    new = from_hf_config(json.loads((folder / "config.json").read_text()))
    old = from_hf_config(json.loads((as_old_format(folder, tmp_path / "old") / "config.json").read_text()))
    assert new == old
    assert new.layer_types.count("full_attention") == 1 and new.layer_types[5] == "full_attention"
    assert (new.rope_theta, new.rope_local_base_freq, new.rope_scaling_factor) == (10_000.0, 500.0, 4.0)
    assert new.query_pre_attn_scalar == 24 and new.num_key_value_heads == 2


@pytest.mark.parametrize("layout", ["new", "old"])
def test_full_forward_matches(reference, tmp_path, layout):
    ref, folder = reference
    if layout == "old":
        folder = as_old_format(folder, tmp_path / "old")
    ours, _ = load_text_model(folder, "float32")
    ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, SEQ, 512)
    assert (got - expected).abs().max().item() <= TOL


def test_cached_decoding_matches_full_forward(reference):
    ref, folder = reference
    ours, _ = load_text_model(folder, "float32")
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits[0]
        cache = KVCache(ours.config, batch=1, max_len=SEQ)
        prefill = 3
        steps = [ours(ids[:, :prefill], positions=torch.arange(prefill)[None], cache=cache)[0]]
        for t in range(prefill, SEQ):
            steps.append(ours(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)[0])
    got = torch.cat(steps)
    # Sliding layers keep only WINDOW slots, yet decoding 3x past the window matches the full forward.
    assert cache.layers[0].k.shape[2] == WINDOW
    assert (got - expected).abs().max().item() <= TOL


def test_final_softcapping_matches(tmp_path):
    ref, folder = save_reference(tmp_path, "capped", final_logit_softcapping=3.0)
    ours, _ = load_text_model(folder, "float32")
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(ids)
        assert (got - ref(ids).logits).abs().max().item() <= TOL
    assert got.abs().max() <= 3.0


def test_attention_softcapping(reference):
    """transformers 5.x Gemma 3 ignores attn_logit_softcapping (no Gemma 3 checkpoint sets it), so check
    the two limits: a huge cap changes nothing, a small one changes the output."""
    ref, folder = reference
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(ids).logits
        ours, _ = load_text_model(folder, "float32")
        for cap, same in ((1e6, True), (0.5, False)):
            ours.config.attn_logit_softcapping = cap
            for layer in ours.layers:
                layer.self_attn.softcap = cap
            assert ((ours(ids) - expected).abs().max().item() <= TOL) is same


def test_left_padded_batch_matches_single(reference):
    _, folder = reference
    ours, _ = load_text_model(folder, "float32")
    short = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    pad = 7
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    positions = torch.cat([torch.full((1, pad), -1), torch.arange(10)[None]], dim=1)
    with torch.no_grad():
        alone = ours(short)
        padded = ours(ids, positions=positions)
    assert (padded[:, pad:] - alone).abs().max().item() <= TOL
