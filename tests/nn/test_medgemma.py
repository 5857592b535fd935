"""Parity of Gemma3Multimodal with transformers' Gemma3ForConditionalGeneration on random weights.

Two configs: a tiny one whose image token id lies past the text vocabulary (as with GGUF text
models), and one with MedGemma's real vision shapes (896 px, patch 14, hidden 1152, 16 heads, MLP
4304, 256 tokens per image, real special-token ids) but 2 vision layers and a small text tower.
Each is saved by transformers itself (5.x layout and config format), then rewritten in the published
google/medgemma layout with a 4.5x config, and in the transformers 4.52 layout. Then llama.cpp's
mmproj GGUF: written with `gguf.GGUFWriter` under llama.cpp's names and conventions, read back.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file, save_file
from skimage import data as skdata

import medgem
from medgem.config import MultimodalConfig, TextConfig, multimodal_from_hf_config, tiny_vision_config
from medgem.engine.cache import KVCache
from medgem.errors import CapabilityError, CheckpointError, InputError
from medgem.nn.medgemma import MultiModalProjector, image_groups
from medgem.nn.vision import SiglipVisionTower
from medgem.weights.export import write_tokenizer_files
from medgem.weights.multimodal import load_multimodal_model, mmproj_name

TOL = 1e-4

TINY = dict(
    text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
              max_position_embeddings=256, rope_theta=10_000.0, rope_local_base_freq=500.0,
              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=7, vision_use_head=False),
    mm=dict(mm_tokens_per_image=4, image_token_index=512, boi_token_index=500, eoi_token_index=501),
)
REAL_VISION = dict(
    text=dict(vocab_size=262_208, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, sliding_window=300, max_position_embeddings=2048,
              layer_types=["sliding_attention", "full_attention"]),
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16, image_size=896,
                patch_size=14, vision_use_head=False),
    mm=dict(mm_tokens_per_image=256, image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000),
)


def save_reference(folder, spec):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=spec["text"], vision_config=spec["vision"], **spec["mm"])
    ref = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the reference starts norms at 0/1 and the projector at 0: randomise them all
        for name, p in ref.named_parameters():
            if "norm" in name or "projector" in name or name.endswith("bias"):
                p.normal_(0, 0.3)
    ref.save_pretrained(folder)
    return ref


def prompt(spec, n_images, seed=0):
    """BOS, text, then per image: BOI, soft tokens, EOI, text (text between and after the images)."""
    mm, vocab = spec["mm"], min(spec["text"]["vocab_size"], 500)
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, vocab - 12, (n,), generator=g).tolist()

    ids = [2, *text(5)]
    for _ in range(n_images):
        ids += [mm["boi_token_index"], *[mm["image_token_index"]] * mm["mm_tokens_per_image"], mm["eoi_token_index"]]
        ids += text(6)
    size = spec["vision"]["image_size"]
    pixels = torch.rand(n_images, 3, size, size, generator=g) * 2 - 1
    return torch.tensor([ids]), pixels


def to_published_layout(src, dest):
    """google/medgemma-* on the hub: `vision_tower.vision_model.*`, text config in the 4.5x format."""
    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    layer_types = text.pop("layer_types")
    text["rope_theta"] = rope["full_attention"]["rope_theta"]
    text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if rope["full_attention"].get("rope_type") == "linear":
        text["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    text["sliding_window_pattern"] = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else 6
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def to_transformers_452_layout(src, dest):
    """What transformers 4.52-4.5x saves: everything under `model.`, plus an explicit lm_head."""
    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    renamed = {}
    for key, value in state.items():
        key = key.replace("language_model.model.", "language_model.", 1)
        key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        renamed[f"model.{key}"] = value
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    save_file(renamed, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "saved"
    return save_reference(folder, TINY), folder


@pytest.fixture(scope="module")
def real_vision(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real") / "saved"
    return save_reference(folder, REAL_VISION), folder


def reference_logits(ref, ids, pixels):
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == ref.config.image_token_id).long()).logits


@pytest.mark.parametrize("layout", ["transformers-5", "published", "transformers-4.52"])
def test_tiny_parity_every_layout(tiny, tmp_path, layout):
    ref, folder = tiny
    if layout == "published":
        folder = to_published_layout(folder, tmp_path / "published")
    elif layout == "transformers-4.52":
        folder = to_transformers_452_layout(folder, tmp_path / "t452")
    ours, _ = load_multimodal_model(folder, "float32")
    assert ours.config.image_token_id == ours.config.text.vocab_size  # out of vocabulary: mapped to pad
    for n_images in (1, 2):
        ids, pixels = prompt(TINY, n_images, seed=n_images)
        with torch.no_grad():
            got = ours(ids, pixels)
        assert got.shape == (1, ids.shape[1], 512)
        assert (got - reference_logits(ref, ids, pixels)).abs().max().item() <= TOL


def test_real_vision_shapes_parity(real_vision, tmp_path):
    ref, folder = real_vision
    published = to_published_layout(folder, tmp_path / "published")
    ours, _ = load_multimodal_model(folder, "float32")
    from_published, _ = load_multimodal_model(published, "float32")
    mine, theirs = ours.state_dict(), from_published.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert ours.config == multimodal_from_hf_config(json.loads((published / "config.json").read_text()))
    ids, pixels = prompt(REAL_VISION, 2, seed=2)  # two images: the prompt outgrows the sliding window
    assert ids.shape[1] > REAL_VISION["text"]["sliding_window"]
    with torch.no_grad():
        got = ours(ids, pixels)
    assert (got - reference_logits(ref, ids, pixels)).abs().max().item() <= TOL


def test_images_change_the_logits_only_after_they_appear(tiny):
    _, folder = tiny
    ours, _ = load_multimodal_model(folder, "float32")
    ids, pixels = prompt(TINY, 1)
    first_image = int((ids[0] == TINY["mm"]["image_token_index"]).nonzero()[0])
    with torch.no_grad():
        a, b = ours(ids, pixels), ours(ids, torch.flip(pixels, dims=[-1]))
    assert torch.equal(a[:, :first_image], b[:, :first_image])
    assert (a[:, first_image:] - b[:, first_image:]).abs().max() > 1e-3


def test_multi_turn_cached_decoding_matches_full_forward(tiny):
    """Turn 1 with an image is prefilled into the KV cache; turn 2 adds a second image and is fed in
    chunks that keep each image whole, then text is decoded token by token. Same logits as one pass."""
    ref, folder = tiny
    ours, _ = load_multimodal_model(folder, "float32")
    ids, pixels = prompt(TINY, 2, seed=7)
    expected = reference_logits(ref, ids, pixels)[0]
    with torch.no_grad():
        embeds, groups = ours.prepare_embeds(ids, pixels)
        positions = torch.arange(ids.shape[1])[None]
        cache = KVCache(ours.text_config, batch=1, max_len=ids.shape[1])
        cuts = [0, 13, ids.shape[1] - 4, *range(ids.shape[1] - 3, ids.shape[1] + 1)]
        steps = []
        for start, end in zip(cuts, cuts[1:]):
            if end - start == 1:
                steps.append(ours(ids[:, start:end], positions=positions[:, start:end], cache=cache)[0])
            else:
                steps.append(ours(inputs_embeds=embeds[:, start:end], positions=positions[:, start:end],
                                  groups=groups[:, start:end], cache=cache)[0])
    assert (torch.cat(steps) - expected).abs().max().item() <= TOL


def test_images_encode_in_chunks_like_one_batch(tiny, monkeypatch):
    """Bounded memory for 85 CT slices: images go through the tower VISION_BATCH at a time, with the
    whole batch's result, and the progress tick counts images."""
    from medgem.nn import medgemma

    monkeypatch.setattr(medgemma, "VISION_BATCH", 2)
    model, _ = load_multimodal_model(tiny[1])
    pixels = torch.randn(3, 3, model.config.vision.image_size, model.config.vision.image_size)
    ticks = []
    with torch.no_grad():
        batched = model.multi_modal_projector(model.vision_tower(pixels))
        one_by_one = model.encode_images(pixels, on_image=lambda: ticks.append(1))
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)
    assert len(ticks) == 3


def test_image_groups_are_contiguous_runs():
    ids = torch.tensor([[1, 9, 9, 2, 9, 3], [9, 9, 9, 1, 1, 9]])
    assert image_groups(ids, 9).tolist() == [[-1, 1, 1, -1, 4, -1], [0, 0, 0, -1, -1, 5]]


def test_mismatched_image_count_is_an_input_error(tiny):
    _, folder = tiny
    ours, _ = load_multimodal_model(folder, "float32")
    ids, pixels = prompt(TINY, 2)
    with pytest.raises(InputError, match="8 image soft tokens but 1 image"):
        ours(ids, pixels[:1])
    with pytest.raises(InputError, match=r"pixel_values must be \[N, 3, 28, 28\]"):
        ours(ids, torch.zeros(2, 3, 32, 32))


def corrupt(folder, dest, edit):
    shutil.copytree(folder, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("vision_tower.encoder.layers.1.mlp.fc2.bias"), "lacks tensor 'encoder.layers.1.mlp.fc2.bias'"),
        (lambda s: s.pop("multi_modal_projector.mm_input_projection_weight"), "mm_input_projection_weight"),
        (lambda s: s.__setitem__("vision_tower.extra.weight", torch.zeros(2)), "unexpected tensor 'extra.weight'"),
        (lambda s: s.__setitem__("audio_tower.weight", torch.zeros(2)), "unexpected tensor 'audio_tower.weight'"),
        (lambda s: s.__setitem__("vision_tower.post_layernorm.weight", torch.zeros(3)), r"shape \(3,\), config expects \(32,\)"),
        (lambda s: s.pop("language_model.model.norm.weight"), "lacks tensor 'norm.weight'"),
    ],
)
def test_broken_checkpoints_are_checkpoint_errors(tiny, tmp_path, edit, message):
    _, folder = tiny
    with pytest.raises(CheckpointError, match=message):
        load_multimodal_model(corrupt(folder, tmp_path / "broken", edit), "float32")


def test_siglip_head_in_checkpoint_is_ignored(tiny, tmp_path):
    """Some checkpoints (tiny test Gemma 3s) keep SigLIP's pooling head, which Gemma 3 never runs."""
    _, folder = tiny
    broken = corrupt(folder, tmp_path / "head", lambda s: s.__setitem__("vision_tower.head.probe", torch.zeros(1, 1, 32)))
    load_multimodal_model(broken, "float32")


# -- llama.cpp mmproj GGUF --------------------------------------------------------------------------
# Facts from llama.cpp (convert_hf_to_gguf.py `Gemma3VisionModel`, gguf-py tensor_mapping.py, clip.cpp):
# HF names map to v.patch_embd, v.position_embd, v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,
# ffn_up (fc1),ffn_down (fc2)}, v.post_ln, mm.input_projection (the bare `mm_input_projection_weight`
# renamed, kept [vision, text] and transposed in clip.cpp's graph), mm.soft_emb_norm (stored as w + 1).
# Embeddings are forced to F32, the projection to F16; other matrices follow the output type.
HF_TO_LLAMA_CPP = {
    "embeddings.patch_embedding": "v.patch_embd",
    "embeddings.position_embedding": "v.position_embd",
    "post_layernorm": "v.post_ln",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def llama_cpp_name(hf_key):
    key = hf_key.removeprefix("vision_tower.").removeprefix("multi_modal_projector.")
    if key == "mm_input_projection_weight":
        return "mm.input_projection.weight"
    if key == "mm_soft_emb_norm.weight":
        return "mm.soft_emb_norm.weight"
    stem, kind = key.rsplit(".", 1)
    if stem.startswith("encoder.layers."):
        _, _, n, leaf = stem.split(".", 3)
        return f"v.blk.{n}.{HF_TO_LLAMA_CPP[leaf]}.{kind}"
    return f"{HF_TO_LLAMA_CPP[stem]}.{kind}"


def write_mmproj(path, state, vision, projection_dim, mm_tokens, quantize_f16=True):
    """llama.cpp's mmproj for HF-named vision/projector tensors and an HF vision_config dict;
    quantize_f16=False keeps every tensor F32 (exact)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(projection_dim)
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_attention_layernorm_eps(vision["layer_norm_eps"])
    writer.add_vision_use_gelu(True)
    pool = (vision["image_size"] // vision["patch_size"]) // round(mm_tokens**0.5)
    if pool != 4:
        writer.add_vision_projector_scale_factor(pool)
    for key, tensor in state.items():
        if not key.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        array = tensor.numpy()
        if "soft_emb_norm" in key:
            array = array + 1.0
        if quantize_f16 and ".embeddings." not in key and array.ndim > 1:  # llama.cpp's --outtype f16
            array = array.astype(np.float16)
        writer.add_tensor(llama_cpp_name(key), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mmproj_of(folder, path, quantize_f16=True, projection_dim=None):
    """The mmproj llama.cpp's converter makes of a saved Gemma3ForConditionalGeneration."""
    cfg = json.loads((folder / "config.json").read_text())
    return write_mmproj(path, load_file(folder / "model.safetensors"), cfg["vision_config"],
                        projection_dim or cfg["text_config"]["hidden_size"], cfg["mm_tokens_per_image"], quantize_f16)


def text_gguf_from(ours, path):
    """Our loaded text tower as a GGUF with llama.cpp's names (norms as w + 1), F32 for exactness."""
    import gguf

    from medgem.weights.gguf_reader import _LAYER_NAMES, _TOP_NAMES

    text = ours.config.text
    to_gguf = {v: k for k, v in {**_LAYER_NAMES, **_TOP_NAMES}.items()}
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_key_length(text.head_dim)
    writer.add_value_length(text.head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_sliding_window(text.sliding_window)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_float32("gemma3.rope.local.freq_base", text.rope_local_base_freq)
    writer.add_float32("gemma3.attention.query_pre_attn_scalar", text.query_pre_attn_scalar)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(text.rope_scaling_factor)
    writer.add_token_list([f"<t{i}>" for i in range(text.vocab_size)])
    for name, tensor in ours.language_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        parts = name.split(".")
        if parts[0] == "layers":
            gguf_name = f"blk.{parts[1]}.{to_gguf['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            gguf_name = f"{to_gguf[parts[0]]}.{parts[-1]}"
        array = tensor.numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        writer.add_tensor(gguf_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_mmproj_names_cover_llama_cpp_layout():
    assert mmproj_name("v.blk.26.attn_out.weight") == "vision_tower.encoder.layers.26.self_attn.out_proj.weight"
    assert mmproj_name("v.blk.0.ffn_up.bias") == "vision_tower.encoder.layers.0.mlp.fc1.bias"
    assert mmproj_name("mm.input_projection.weight") == "multi_modal_projector.mm_input_projection_weight"
    assert mmproj_name("v.blk.0.attn_qkv.weight") is None


@pytest.mark.parametrize("f16", [False, True])
def test_gguf_with_mmproj_matches_reference(tiny, tmp_path, f16):
    ref, folder = tiny
    from_hf, _ = load_multimodal_model(folder, "float32")
    text = text_gguf_from(from_hf, tmp_path / "text.gguf")
    mmproj = mmproj_of(folder, tmp_path / "mmproj.gguf", quantize_f16=f16)
    ours, info = load_multimodal_model(text, "float32", mmproj=mmproj)
    assert info["format"] == "gguf" and ours.config.mm_tokens_per_image == 4
    ids, pixels = prompt(TINY, 2, seed=3)
    # llama.cpp stores no image token id: Gemma 3's is always 262144, past this 512-token vocabulary.
    assert ours.config.image_token_id == 262_144
    with torch.no_grad():
        got = ours(torch.where(ids == TINY["mm"]["image_token_index"], 262_144, ids), pixels)
    expected = reference_logits(ref, ids, pixels)
    error = (got - expected).abs().max().item()
    # F16 matrices (what llama.cpp ships) round the tower (2.4e-4 measured); F32 must match to TOL.
    assert error <= (2e-3 if f16 else TOL)


def test_mmproj_from_another_model_is_refused(tiny, tmp_path):
    _, folder = tiny
    from_hf, _ = load_multimodal_model(folder, "float32")
    text = text_gguf_from(from_hf, tmp_path / "text.gguf")
    mmproj = mmproj_of(folder, tmp_path / "mmproj.gguf", projection_dim=128)
    with pytest.raises(CheckpointError, match="projects to width 128.*hidden size 64"):
        load_multimodal_model(text, "float32", mmproj=mmproj)
    with pytest.raises(CheckpointError, match="not an mmproj|not a Gemma 3 text weight|unexpected tensor"):
        load_multimodal_model(text, "float32", mmproj=text)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes((tmp_path / "mmproj.gguf").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_multimodal_model(text, "float32", mmproj=truncated)


# -- end to end through medgem.load ----------------------------------------------------------------
CHAT = {**TINY, "text": {**TINY["text"], "vocab_size": 262_208},
        "mm": dict(mm_tokens_per_image=4, image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000)}


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, embedded_gguf):
    """A random multimodal checkpoint with Gemma's real vocabulary, tokenizer.json and preprocessor config."""
    folder = tmp_path_factory.mktemp("chat") / "medgemma-tiny"
    ref = save_reference(folder, CHAT)
    ref.generation_config.eos_token_id = [1, 106]
    write_tokenizer_files(embedded_gguf, folder, image_token=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pan_and_scan": None}))
    return ref, folder


def xray_messages(*extra_images):
    return [
        {"role": "system", "content": "You are an expert radiologist."},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                     {"type": "image", "image": get_testdata_file("RG1_UNCR.dcm")},
                                     *({"type": "image", "image": im} for im in extra_images)]},
    ]


def test_pipeline_generates_like_transformers(chat_checkpoint):
    """medgem.load on the folder, a DICOM chest X-ray in the chat: greedy tokens equal transformers'
    generate on the same processed inputs."""
    ref, folder = chat_checkpoint
    pipe = medgem.load(folder, dtype="float32")
    assert pipe.supports_images and pipe.processor.image_processor.size == 28
    messages = xray_messages()
    got = pipe.complete([messages], max_new_tokens=6)[0]
    inputs = pipe.processor.apply_chat_template(messages)
    assert got.prompt_tokens == inputs.input_ids.shape[1]
    with torch.no_grad():
        expected = ref.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                                token_type_ids=inputs.token_type_ids, max_new_tokens=6, do_sample=False)
    assert got.token_ids == expected[0, inputs.input_ids.shape[1]:].tolist()[: len(got.token_ids)]
    assert len(got.token_ids) >= 1


def test_pipeline_batches_prompts_with_different_image_counts(chat_checkpoint):
    _, folder = chat_checkpoint
    pipe = medgem.load(folder, dtype="float32")
    prompts = [xray_messages(Image.fromarray(skdata.retina())), "Plain text question?", xray_messages()]
    batch = pipe.complete(prompts, max_new_tokens=4)
    alone = [pipe.complete([p], max_new_tokens=4)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert "".join(pipe.stream(prompts[0], max_new_tokens=4)) == alone[0].text


def test_text_only_model_refuses_images(real_pipe):
    assert not real_pipe.supports_images
    with pytest.raises(CapabilityError, match="has no vision tower"):
        real_pipe.generate(xray_messages(), max_new_tokens=2)


def test_embedded_gguf_with_mmproj_reads_images(embedded_gguf, tmp_path):
    """The real Gemma 3 270M GGUF plus a (random) llama.cpp mmproj projecting to its 640 wide hidden size."""
    vision = tiny_vision_config()
    torch.manual_seed(0)
    cfg = MultimodalConfig(text=TextConfig(), vision=vision, mm_tokens_per_image=4)
    projector = MultiModalProjector(cfg)
    with torch.no_grad():
        projector.mm_input_projection_weight.normal_(0, 0.5)
    state = {f"vision_tower.{k}": v for k, v in SiglipVisionTower(vision).state_dict().items()}
    state |= {f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", state, vision.to_dict(), 640, 4)
    pipe = medgem.load(embedded_gguf, mmproj=mmproj, dtype="float32")
    assert pipe.supports_images and pipe.model.config.vision == vision
    text = pipe.generate(xray_messages(), max_new_tokens=3)
    assert isinstance(text, str)
    inputs = [pipe.processor.apply_chat_template(xray_messages(im)) for im in (get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm"))]
    with torch.no_grad():
        a, b = (pipe.model(i.input_ids, i.pixel_values, last_only=True) for i in inputs)
    assert (a - b).abs().max() > 1e-3  # the second image reaches the logits
