"""The LoRA layer: targets, identity at init, merge, save/load, and frozen int8/int4 bases."""

from __future__ import annotations

import pytest
import torch

from medgem.engine.quant import Int4Linear, Int8Linear, quantize_text_model
from medgem.errors import CheckpointError, ConfigError
from medgem.train.lora import (
    FrozenLinear,
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)

from .conftest import tiny_multimodal, tiny_text


def ids(n=12, seed=0):
    return torch.randint(3, 5000, (2, n), generator=torch.Generator().manual_seed(seed))


def randomise_b(model, seed=1):
    """A trained-looking adapter: B is zero at init, which would make merging trivially exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_all_linear_targets_every_projection_but_the_head():
    model = apply_lora(tiny_text(), LoraConfig())
    paths = set(lora_modules(model))
    attention = {f"layers.{i}.self_attn.{leaf}" for i in range(4) for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = {f"layers.{i}.mlp.{leaf}" for i in range(4) for leaf in ("gate_proj", "up_proj", "down_proj")}
    assert paths == attention | mlp
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    mm = apply_lora(tiny_multimodal(), LoraConfig(target_modules=["q_proj", "fc1"]))
    assert any(p.startswith("vision_tower.") and p.endswith("fc1") for p in lora_modules(mm))
    assert all(p.endswith(("q_proj", "fc1")) for p in lora_modules(mm))


def test_layers_option_adapts_only_those_decoder_layers():
    model = apply_lora(tiny_multimodal(), LoraConfig(layers=[2, 3]))
    assert {p.split(".")[2] for p in lora_modules(model)} == {"2", "3"}
    assert all(p.startswith("language_model.layers.") for p in lora_modules(model))
    with pytest.raises(ConfigError, match="no linear layer matches"):
        apply_lora(tiny_text(), LoraConfig(layers=[99]))


def test_fresh_adapter_is_identity_and_merge_matches_unmerged():
    base = tiny_text()
    with torch.no_grad():
        expected = base(ids())
    model = apply_lora(tiny_text(), LoraConfig(dropout=0.1)).eval()
    with torch.no_grad():
        assert torch.equal(model(ids()), expected)
    randomise_b(model)
    with torch.no_grad():
        adapted = model(ids())
        assert (adapted - expected).abs().max() > 1e-3
        merged = merge_lora(model)(ids())
    assert not lora_modules(model)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_adapter_round_trip_and_mismatch(tmp_path):
    cfg = LoraConfig(r=4)
    model = apply_lora(tiny_text(), cfg).eval()
    randomise_b(model)
    save_adapter(model, cfg, tmp_path / "adapter", "tiny")
    fresh = tiny_text()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids()), model(ids()), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(tiny_text(), tmp_path)
    other = tiny_multimodal()
    with pytest.raises(CheckpointError, match="does not have"):
        load_adapter(other, tmp_path / "adapter")  # text paths do not exist in a multimodal model


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_frozen_quantized_base_passes_the_right_input_gradient(kind):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96, bias=False)
    quantized = kind(dense.weight.data)
    layer = LoRALinear(quantized, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    reference = dense.weight.detach().float() + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = torch.ones(5, 96) @ reference
    torch.testing.assert_close(x.grad.float(), expected, atol=0.15, rtol=0.05)  # int4 rounding and bf16
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_qlora_trains_on_a_quantized_model():
    model = tiny_text()
    quantize_text_model(model, "int8")
    apply_lora(model, LoraConfig(dropout=0.0))
    assert isinstance(model.lm_head, FrozenLinear)  # the tied int8 head passes gradients back
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids(16)
    losses = []
    for _ in range(8):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_merge_keeps_the_biases_of_vision_linears():
    model = apply_lora(tiny_multimodal(), LoraConfig()).eval()
    randomise_b(model)
    cfg = model.config
    x = torch.tensor([[2, 100, cfg.boi_token_id, *[cfg.image_token_id] * 4, cfg.eoi_token_id, 300]])
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        adapted = model(x, pixels)
        fc1 = model.vision_tower.encoder.layers[0].mlp.fc1.base.bias.clone()
        merged = merge_lora(model)(x, pixels)
    assert torch.equal(model.vision_tower.encoder.layers[0].mlp.fc1.bias, fc1)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_checkpointing_gives_the_same_gradients(dtype):
    """Recomputing layers in the backward pass changes memory, not the gradient (fp32 exactly, bf16 closely)."""
    from medgem.train.sft import CausalLMLoss, enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = apply_lora(tiny_text().to(dtype), LoraConfig(dropout=0.1))
        randomise_b(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        x = ids(16)
        torch.manual_seed(0)  # the same dropout masks, recomputed identically by the checkpoint
        loss = CausalLMLoss(model.train())(x, x, torch.arange(16).expand(2, 16))
        loss.backward()
        assert torch.isfinite(loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], atol=0 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)
