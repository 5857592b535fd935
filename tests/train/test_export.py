"""Merged weights leave medgem in formats others load: transformers reads the HF export with logits
within 1e-4 of ours; the `gguf` reader finds llama.cpp's tensor names and conventions in the GGUF and
mmproj, and medgem loads them back to the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medgem
from medgem.processing.images import ImageProcessor
from medgem.processing.tokenizer import Tokenizer
from medgem.train.lora import LoraConfig, apply_lora, merge_lora, save_adapter
from medgem.weights import gguf_reader, load_text_model, medgem_home
from medgem.weights.export import export_gguf, export_hf, export_mmproj

from .conftest import colour_image, run_cli, tiny_multimodal, tiny_text
from .test_lora import randomise_b

TOL = 1e-4
LLAMA_CPP_BLOCK = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "attn_norm",
                   "post_attention_norm", "ffn_norm", "post_ffw_norm", "ffn_gate", "ffn_up", "ffn_down"}


def merged(model):
    apply_lora(model, LoraConfig(r=4))
    randomise_b(model)
    return merge_lora(model).eval()


@pytest.fixture(scope="module")
def merged_text():
    return merged(tiny_text(seed=5))


@pytest.fixture(scope="module")
def prompt_ids(tiny_text_dir):
    tokenizer = Tokenizer.from_folder(tiny_text_dir)
    return torch.tensor([tokenizer.encode("Patient record: potassium 4.2 mmol/L on 2024-01-03. Answer:")])


def test_hf_export_loads_in_transformers(merged_text, prompt_ids, tiny_text_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export_hf(merged_text, tmp_path / "hf", tiny_text_dir)
    ref, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref.eval()
    with torch.no_grad():
        ours, theirs = merged_text(prompt_ids), ref(prompt_ids).logits
    assert (ours - theirs).abs().max() < TOL
    text = "Potassium 4.2 mmol/L <start_of_turn>model\n  spaces"
    ours_tok = Tokenizer.from_folder(folder)
    assert AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(
        text, add_bos=False)


def test_hf_export_refuses_unmerged_models_and_full_folders(tiny_text_dir, tmp_path):
    from medgem.errors import InputError

    with pytest.raises(InputError, match="merge adapters"):
        export_hf(apply_lora(tiny_text(), LoraConfig()), tmp_path / "x", tiny_text_dir)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_hf(tiny_text(), tmp_path / "full", tiny_text_dir)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_multimodal_hf_export_loads_in_transformers(tiny_text_dir, tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    model = merged(tiny_multimodal(seed=6))
    folder = export_hf(model, tmp_path / "mm", tiny_text_dir, image_processor=ImageProcessor(size=28))
    ref, info = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref.eval()
    cfg = model.config
    ids = torch.tensor([[2, 100, 200, cfg.boi_token_id, *[cfg.image_token_id] * 4, cfg.eoi_token_id, 300, 400]])
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = model(ids, pixels)
        theirs = ref(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_id).long()).logits
    assert (ours - theirs[..., : ours.shape[-1]]).abs().max() < TOL
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 28, "width": 28}


def reload(path) -> torch.nn.Module:
    """The text model in a GGUF, through medgem's loader, dense float32."""
    return load_text_model(path, "float32")[0]


def test_gguf_export_has_llama_cpp_names_and_reloads(merged_text, prompt_ids, tiny_text_dir, embedded_gguf, tmp_path):
    path = export_gguf(merged_text, tmp_path / "model.gguf", tiny_text_dir, tensor_type="f32")
    reader = gguf_reader.GGUFIndex.load(path)
    names = {t.name for t in reader.tensors}
    expected = {f"blk.{i}.{leaf}.weight" for i in range(4) for leaf in LLAMA_CPP_BLOCK}
    assert names == expected | {"token_embd.weight", "output_norm.weight"}  # tied head: no `output`
    meta = reader.metadata
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.block_count"] == 4
    norm = next(t for t in reader.tensors if t.name == "blk.1.post_ffw_norm.weight")
    stored = gguf_reader.dequantize(norm)
    assert np.allclose(stored, merged_text.layers[1].post_feedforward_layernorm.weight.detach().numpy() + 1.0)
    # The vocabulary rebuilt from tokenizer.json is the one llama.cpp's converter wrote for the real model.
    original, exported = gguf_reader.read_header(embedded_gguf).fields, gguf_reader.read_header(path).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert exported[key] == original[key], key
    with torch.no_grad():
        assert (reload(path)(prompt_ids) - merged_text(prompt_ids)).abs().max() < TOL
    tokenizer = Tokenizer.from_gguf(reader, medgem_home() / "tokenizers")
    text = "Potassium 4.2 mmol/L"
    assert tokenizer.encode(text) == Tokenizer.from_folder(tiny_text_dir).encode(text)


def test_q8_gguf_is_close(merged_text, prompt_ids, tiny_text_dir, tmp_path):
    path = export_gguf(merged_text, tmp_path / "q8.gguf", tiny_text_dir, tensor_type="q8_0")
    reader = gguf_reader.GGUFIndex.load(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    with torch.no_grad():
        a, b = reload(path)(prompt_ids)[0, -1], merged_text(prompt_ids)[0, -1]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_mmproj_export_reloads_with_the_text_gguf(tiny_text_dir, tmp_path):
    model = merged(tiny_multimodal(seed=7))
    text = export_gguf(model, tmp_path / "model.gguf", tiny_text_dir, tensor_type="f32")
    mmproj = export_mmproj(model, tmp_path / "mmproj.gguf", ImageProcessor(size=28), tensor_type="f32")
    names = {t.name for t in gguf_reader.GGUFIndex.load(mmproj).tensors}
    assert {"v.patch_embd.weight", "v.position_embd.weight", "v.post_ln.weight", "mm.input_projection.weight",
            "mm.soft_emb_norm.weight", "v.blk.1.attn_out.weight", "v.blk.0.ffn_up.bias"} <= names
    back = medgem.load(text, mmproj=mmproj, dtype="float32", quant="none")
    cfg = model.config
    ids = torch.tensor([[2, 100, cfg.boi_token_id, *[cfg.image_token_id] * 4, cfg.eoi_token_id, 300]])
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert (back.model(ids, pixels) - model(ids, pixels)).abs().max() < TOL


def test_cli_merge_writes_both_formats(tiny_mm_dir, tmp_path):
    pipe = medgem.load(tiny_mm_dir, dtype="float32", quant="none")
    cfg = LoraConfig(r=4)
    apply_lora(pipe.model, cfg)
    randomise_b(pipe.model)
    save_adapter(pipe.model, cfg, tmp_path / "adapter", str(tiny_mm_dir))
    image = colour_image(tmp_path / "red.png", "red", np.random.default_rng(0))
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Colour?"}]}]
    pipe.model.eval()
    expected = pipe.complete([messages], max_new_tokens=4, temperature=0.0)[0].token_ids
    result = run_cli(["finetune", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
                      "--format", "both", "--gguf-type", "f32"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "model.gguf",
            "mmproj.gguf"} <= {p.name for p in out.iterdir()}
    for loaded in (medgem.load(out, dtype="float32", quant="none"),
                   medgem.load(out / "model.gguf", mmproj=out / "mmproj.gguf", dtype="float32", quant="none")):
        assert loaded.complete([messages], max_new_tokens=4, temperature=0.0)[0].token_ids == expected


@pytest.mark.slow
def test_llama_cpp_runs_a_merged_real_model(real_pipe, embedded_gguf, tmp_path):
    """The embedded 270M with a merged adapter, exported to GGUF: llama.cpp (llama-cpp-python, when it is
    installed; ENVIRONMENT.md has the build flags) gives the same next-token logits as medgem."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import copy

    model = copy.deepcopy(real_pipe.model)
    apply_lora(model, LoraConfig(layers=[16, 17]))
    randomise_b(model)
    merge_lora(model)
    path = export_gguf(model, tmp_path / "merged.gguf", embedded_gguf, tensor_type="f32")
    ids = real_pipe.tokenizer.encode("The patient was started on metformin for type 2 diabetes. A common side effect is")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1].numpy()
        base = real_pipe.model(torch.tensor([ids]))[0, -1].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    assert np.abs(ours - base).max() > 0.1  # the adapter changed the model, so agreement is about the merge
    assert np.abs(ours - theirs).max() < 0.05
    assert list(np.argsort(-ours)[:5]) == list(np.argsort(-theirs)[:5])
