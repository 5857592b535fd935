"""Weight-only quantization: kernel arithmetic on random matrices, and agreement on the real 270M."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import medgem
from medgem.engine import blocks, quant, vnni
from medgem.engine.blocks import BlockLinear
from medgem.engine.quant import (
    CheckpointEmbedding,
    Int4Linear,
    Int8Embedding,
    Int8HeadLinear,
    Int8Linear,
    greedy_agreement,
    load_quantized_text_model,
    quantize_text_model,
)
from medgem.errors import CheckpointError, InputError
from medgem.weights import load_text_model, open_text_checkpoint


def relative_error(layer, weight, x):
    ref = x @ weight.T
    return ((layer(x.bfloat16()).float() - ref).norm() / ref.norm()).item()


def test_int8_and_int4_kernels_match_dense_matmul():
    torch.manual_seed(0)
    weight, x = torch.randn(384, 640), torch.randn(5, 640)
    assert relative_error(Int8Linear(weight), weight, x) < 0.01
    int4 = relative_error(Int4Linear(weight, 32), weight, x)
    assert int4 < 0.1
    assert relative_error(Int4Linear(weight, 128), weight, x) > int4  # larger groups, coarser
    with pytest.raises(InputError, match="group size 48"):
        Int4Linear(weight, 48)
    strided = torch.randn(2, 6, 640).bfloat16()[:, ::2]  # a batch's slice of a prompt: not contiguous
    for layer in (Int8Linear(weight), Int4Linear(weight, 32)):
        assert torch.equal(layer(strided), layer(strided.contiguous()))


def test_int8_embedding_looks_up_scaled_rows():
    torch.manual_seed(1)
    weight = torch.randn(100, 64)
    emb = Int8Embedding(weight, 8.0)
    ids = torch.tensor([[3, 7, 99]])
    expected = Int8Linear(weight).dequantized()[ids] * 8.0
    assert torch.allclose(emb(ids).float(), expected, rtol=1e-2, atol=1e-2)  # bf16 rounding only


def test_int8_head_rows_do_not_depend_on_their_batch():
    """Each row rounded to int8 on its own scale and summed exactly: alone or among others, the same logits."""
    torch.manual_seed(2)
    weight, x = torch.randn(3000, 640), torch.randn(9, 640) * torch.linspace(0.1, 30, 9)[:, None]
    head = Int8HeadLinear(weight)
    batched = head(x)
    for i in range(len(x)):
        assert torch.equal(head(x[i:i + 1]), batched[i:i + 1])
    assert ((batched - x @ weight.T).norm() / (x @ weight.T).norm()).item() < 0.02  # int8 x int8
    q, scale = head.int8_weight(), head.scales  # the integer arithmetic, spelled out
    step = x.abs().amax(1, keepdim=True) / 127
    exact = (torch.round(x / step).to(torch.int64) @ q.to(torch.int64).T).float() * scale * step
    torch.testing.assert_close(batched, exact, rtol=1e-5, atol=1e-4)
    twin = copy.deepcopy(head)
    assert torch.equal(twin(x), batched) and torch.equal(twin.dequantized(), head.dequantized())


def test_int8_head_without_onednn_computes_the_same(monkeypatch):
    """Where PyTorch lacks oneDNN the head falls back to torch._int_mm: the same integers, the same logits."""
    torch.manual_seed(4)
    weight, x = torch.randn(500, 64), torch.randn(3, 64)
    monkeypatch.setattr(quant, "ONEDNN", False)
    plain = Int8HeadLinear(weight)
    monkeypatch.undo()
    assert not plain.packed and Int8HeadLinear(weight).packed == quant.ONEDNN
    assert torch.equal(plain(x), Int8HeadLinear(weight)(x))


def test_checkpoint_embedding_reads_the_files_rows(embedded_gguf, tmp_path):
    """The quantized model's lookup reads rows from the GGUF, exactly as stored, even after the path is gone."""
    _, tensors, _ = open_text_checkpoint(embedded_gguf)
    table = tensors["embed_tokens.weight"]
    ids = torch.tensor([[2, 262143, 7, 2], [105, 106, 0, 5000]])
    expected = torch.stack([torch.cat([table[i:i + 1] for i in row]) for row in ids.tolist()])
    assert torch.equal(table.gather(ids), expected)
    emb = CheckpointEmbedding(table, 4.0)
    assert torch.equal(emb(ids), expected.bfloat16() * torch.tensor(4.0, dtype=torch.bfloat16))
    for bad in (262144, -1):  # a read past the table would return another tensor's bytes: refused
        with pytest.raises(IndexError, match=f"row {bad} is out of range"):
            emb(torch.tensor([[5, bad]]))
    copy_path = tmp_path / "copy.gguf"  # a model outlives its file being replaced or deleted
    copy_path.write_bytes(embedded_gguf.read_bytes())
    _, copied, _ = open_text_checkpoint(copy_path)
    moved = CheckpointEmbedding(copied["embed_tokens.weight"], 4.0)
    copy_path.unlink()
    assert torch.equal(moved(ids), emb(ids))


def test_unknown_mode():
    with pytest.raises(InputError, match="unknown quantization"):
        medgem.load(quant="int3")


@pytest.mark.slow
def test_int8_greedy_agrees_with_fp32_on_real_weights(real_pipe):
    prompts = ["The most common cause of community-acquired pneumonia is",
               "Insulin is produced by", "Symptoms of a stroke include"]
    prompt_ids = [real_pipe.prompt_ids(p, raw=True) for p in prompts]
    reference = [c.token_ids for c in real_pipe.complete(prompts, raw=True, max_new_tokens=24)]
    sequences = [p + r for p, r in zip(prompt_ids, reference)]
    lens = [len(p) for p in prompt_ids]
    assert greedy_agreement(real_pipe.model, sequences, lens) == 1.0  # the reference agrees with itself
    quant = medgem.load(quant="int8")
    head = (BlockLinear, Int8Linear, Int8HeadLinear)  # by the CPU's kernels (engine/blocks.py, engine/vnni.py)
    assert isinstance(quant.model.lm_head, head) and isinstance(quant.model.embed_tokens, CheckpointEmbedding)
    agree = greedy_agreement(quant.model, sequences, lens)
    assert agree >= 0.9, f"int8 greedy agreement {agree:.2f}"


def test_quantize_rejects_non_cpu_modes():
    with pytest.raises(InputError, match="CPU kernels|CPU-only build"):  # the latter where torch has no CUDA
        medgem.load(quant="int8", device="cuda")


def test_quantize_text_model_none_is_identity():
    from medgem.config import tiny_text_config
    from medgem.nn.text import Gemma3Text

    model = Gemma3Text(tiny_text_config())
    assert quantize_text_model(model, "none") is model and isinstance(model.lm_head, torch.nn.Linear)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "embed_tokens.") -> bool:
    """Equal state dicts (oneDNN's packed head compared unpacked), apart from names starting with `skip`."""
    def plain(module):
        return {k: v.to_dense() if v.is_mkldnn else v for k, v in module.state_dict().items() if not k.startswith(skip)}
    sa, sb = plain(a), plain(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_loading_straight_into_int8_equals_quantizing_the_dense_model(embedded_gguf):
    """The streamed loader (rows dequantized and quantized a slice at a time) builds the same matmuls;
    its embedding rows come from the file at full precision where the in-memory one rounds them to int8."""
    dense, _ = load_text_model(embedded_gguf, "float32")
    dense_rows = dense.embed_tokens.weight.detach().clone()
    reference = quantize_text_model(dense, "int8")
    cfg, tensors, _ = open_text_checkpoint(embedded_gguf)
    streamed = load_quantized_text_model(cfg, tensors, "int8", embedded_gguf.name)
    assert same_weights(streamed, reference)
    assert isinstance(streamed.embed_tokens, CheckpointEmbedding) and isinstance(reference.embed_tokens, Int8Embedding)
    assert streamed.inv_freq_global.dtype == torch.float32  # RoPE frequencies are not weights: never bf16
    ids = torch.tensor([[2, 818, 6213, 563, 1164]])
    with torch.inference_mode():
        assert torch.equal(streamed.embed_tokens.rows.gather(ids), dense_rows[ids])
        a, b = streamed(ids), reference(ids)
        assert torch.equal(a.argmax(-1), b.argmax(-1)) and ((a - b).norm() / b.norm()).item() < 0.08  # bf16 noise


@pytest.mark.parametrize("kernels", ["cpu's", "pytorch"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_quantized_load_from_safetensors(tmp_path, mode, kernels, request):
    """The HF path slices safetensors rows; an untied head gets its own quantized matrix."""
    from safetensors.torch import save_file

    from medgem.config import tiny_text_config, to_hf_config
    from medgem.nn.text import Gemma3Text

    if kernels == "pytorch":
        request.getfixturevalue("pytorch_kernels")
    torch.manual_seed(3)
    model = Gemma3Text(tiny_text_config(tie_word_embeddings=False, vocab_size=20_000)).eval()
    save_file({f"model.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(model.config)))
    rows = model.embed_tokens.weight.detach().clone()
    reference = quantize_text_model(model, mode)
    cfg, tensors, _ = open_text_checkpoint(tmp_path)
    streamed = load_quantized_text_model(cfg, tensors, mode, "tiny", group_size=32)
    expected = (Int8Linear, Int8HeadLinear) if mode == "int8" else Int4Linear
    vnni_head = mode == "int8" and vnni.fits(*rows.shape)  # the head is [vocab, hidden]; AVX-512 VNNI keeps its int8 panels
    if blocks.available() and not vnni_head:  # dense rows become Q8_0 for int8, Q4_1 for int4
        expected = BlockLinear
        assert streamed.lm_head.kind == (blocks.Q8_0 if mode == "int8" else blocks.Q4_1)
    assert same_weights(streamed, reference) and isinstance(streamed.lm_head, expected)
    ids = torch.tensor([[5, 19_999, 5]])
    assert torch.equal(streamed.embed_tokens.rows.gather(ids), rows[ids])
    with pytest.raises(CheckpointError, match="lacks tensor 'norm.weight'"):
        load_quantized_text_model(cfg, {k: v for k, v in tensors.items() if k != "norm.weight"}, mode, "tiny")


@pytest.mark.parametrize("kernels", ["cpu's", "pytorch"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_projections_match_the_parts_and_yield_to_a_replaced_part(mode, kernels, request):
    """q/k/v and gate/up run as one matmul over stacked rows (engine/quant.py): the same logits as one
    call per part, no second copy of the weights, and a part replaced later (LoRA) is never bypassed."""
    from medgem.config import tiny_text_config
    from medgem.nn.text import Gemma3Text

    if kernels == "pytorch":
        request.getfixturevalue("pytorch_kernels")
    torch.manual_seed(4)
    model = quantize_text_model(Gemma3Text(tiny_text_config(head_dim=32)).eval(), mode)  # k, v: 64 rows
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.fused is not None and mlp.fused is not None
    if isinstance(attn.q_proj, BlockLinear):  # one kernel call over the parts' own blocks
        assert attn.fused.linear.parts == (attn.q_proj, attn.k_proj, attn.v_proj)
    else:
        assert attn.q_proj.qweight.untyped_storage().data_ptr() == attn.fused.linear.qweight.untyped_storage().data_ptr()
    assert "fused" not in "".join(name for name, _ in model.named_modules())  # LoRA and state dicts see the parts
    ids = torch.tensor([[3, 17, 99, 4, 250, 8]])
    with torch.inference_mode():
        fused = model(ids)
        stacks = [(layer.self_attn.fused, layer.mlp.fused) for layer in model.layers]
        for layer in model.layers:
            layer.self_attn.fused = layer.mlp.fused = None
        apart = model(ids)
        for layer, (a, m) in zip(model.layers, stacks):
            layer.self_attn.fused, layer.mlp.fused = a, m
        assert torch.equal(fused, apart)
        quiet = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
        torch.nn.init.zeros_(quiet.weight)
        attn.q_proj = quiet.to(torch.bfloat16)  # what LoRA's wrapping does: the fused stack no longer applies
        assert not torch.equal(model(ids), fused)
    odd = quantize_text_model(Gemma3Text(tiny_text_config()).eval(), mode)  # k, v: 32 rows
    # Half of PyTorch's int4 block of rows: kept apart. The block kernel stacks any rows.
    assert (odd.layers[0].self_attn.fused is None) == (mode == "int4" and not blocks.available())


def test_checkpoint_embedding_keeps_recent_rows_and_stays_exact(tmp_path, monkeypatch):
    """Rows read from the file are kept (at most RECENT, least recently used out first); a kept row is
    the same as a fresh read, and ids outside the table are still refused."""
    from safetensors.torch import save_file

    from medgem.config import tiny_text_config, to_hf_config
    from medgem.nn.text import Gemma3Text

    torch.manual_seed(5)
    model = Gemma3Text(tiny_text_config(vocab_size=1000)).eval()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(model.config)))
    _, tensors, _ = open_text_checkpoint(tmp_path)
    monkeypatch.setattr(CheckpointEmbedding, "RECENT", 4)
    embed = CheckpointEmbedding(tensors["embed_tokens.weight"], 8.0)
    table = (model.embed_tokens.weight.detach().to(torch.bfloat16) * torch.tensor(8.0, dtype=torch.bfloat16))
    reads = []
    gather = embed.rows.gather
    monkeypatch.setattr(embed.rows, "gather", lambda ids: reads.append(ids.tolist()) or gather(ids))
    for ids in ([[7, 3, 7]], [[3, 9]], [[1, 2, 5]], [[3]], [[9, 7]]):
        batch = torch.tensor(ids)
        assert torch.equal(embed(batch), table[batch])
    # 1, 2 and 5 push out 7 and 3 (least recently used), so 3 is read again, then 7 and 9
    assert reads == [[3, 7], [9], [1, 2, 5], [3], [7, 9]] and list(embed._recent) == [5, 3, 9, 7]
    with pytest.raises(IndexError, match="row 1000 is out of range"):
        embed(torch.tensor([[4, 1000]]))


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The [out, in] matrix a linear layer applies (its outputs for the unit vectors)."""
    with torch.inference_mode():
        return layer(torch.eye(layer.in_features, dtype=torch.bfloat16)).float().T


def test_int4_keeps_the_files_own_4bit_codes(embedded_gguf, pytorch_kernels):
    """A Q4_K tensor of the real 270M becomes int4 with the codes, scales and mins the file stores: what
    the layer applies is the file's weight up to the bf16 rounding of scales and outputs, well inside
    what rounding the same weights onto a 4-bit grid of its own costs."""
    cfg, tensors, _ = open_text_checkpoint(embedded_gguf)
    rows = tensors["layers.3.self_attn.o_proj.weight"]
    assert rows.int4_group == 32 and rows.stored_bits == 4.5  # Q4_K
    stored = rows.read()
    exact = (effective_weight(Int4Linear(rows, 32)) - stored).abs().mean()
    rounded_again = (effective_weight(Int4Linear(stored, 32)) - stored).abs().mean()
    assert exact < rounded_again / 3
    assert (effective_weight(Int4Linear(rows, 64)) - stored).abs().mean() > exact  # 64-wide groups: rounded
    assert tensors["layers.3.self_attn.q_proj.weight"].int4_group is None  # Q5_0: int8 in int4 mode
    model = load_quantized_text_model(cfg, tensors, "int4", embedded_gguf.name)
    layer = model.layers[3]
    assert isinstance(layer.self_attn.o_proj, Int4Linear) and isinstance(layer.self_attn.q_proj, Int8Linear)


def test_default_quant_keeps_a_big_ggufs_blocks(tmp_path):
    """No --quant: a GGUF over 1 GiB keeps its blocks (re-rounding a 4B took a minute a start), a small one
    becomes int8, and a dtype or another device keeps dense weights."""
    from medgem.pipeline import FILE_BLOCKS_MIN_BYTES, default_quant

    big, small = tmp_path / "big.gguf", tmp_path / "small.gguf"
    with big.open("wb") as f:  # sparse: no disk is written
        f.truncate(FILE_BLOCKS_MIN_BYTES + 1)
    small.write_bytes(b"GGUF")
    assert default_quant(big, "cpu", None) == ("gguf" if blocks.available() else "int8")
    assert default_quant(small, "cpu", None) == "int8" and default_quant(tmp_path, "cpu", None) == "int8"
    assert default_quant(big, "cpu", "bfloat16") == "none" and default_quant(big, "cuda", None) == "none"
