"""Recipes (processing/recipes.py): the CT prompt's tokens against transformers' Gemma3Processor with the
published chat template (the notebook's own `processor.apply_chat_template` call), a random-weight
multimodal model's logits on that prompt against transformers, the budget refusal, and the
longitudinal order from DICOM dates."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

import medgem
from medgem.config import MULTIMODAL_PRESETS
from medgem.errors import ContextLengthError, InputError
from medgem.inputs.images import load_image
from medgem.processing.multimodal import MultimodalProcessor
from medgem.processing.recipes import EVIDENCE, build

SOFT = 262_144
QUESTION = "Is there a hypodense liver lesion?"


def notebook_messages(images, instruction, query):
    """The notebook's layout, written out: instruction, (image, 'SLICE n') pairs, then the query."""
    content = [{"type": "text", "text": instruction}]
    for n, image in enumerate(images, 1):
        content += [{"type": "image", "image": image}, {"type": "text", "text": f"SLICE {n}"}]
    content.append({"type": "text", "text": query})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_medgemma):
    return medgem.load(tiny_medgemma, dtype="float32")


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory, series_writer):
    folder = tmp_path_factory.mktemp("ct6")
    series_writer(folder, 6)
    return folder


def test_ct_prompt_tokens_equal_transformers_gemma3_processor(ct_folder, tokenizer, hf_processor):
    prompt = build("ct", QUESTION, source=ct_folder)
    content = prompt.messages[0]["content"]
    images = [part["image"] for part in content if part["type"] == "image"]
    assert prompt.images == len(images) == 6 and prompt.volume.indices == list(range(6))
    query = "\n\n" + EVIDENCE + "is there a hypodense liver lesion?"
    assert prompt.messages == notebook_messages(images, content[0]["text"], query)
    ours = MultimodalProcessor.for_model(tokenizer, MULTIMODAL_PRESETS["4b"]).apply_chat_template(prompt.messages)
    theirs = hf_processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                              continue_final_message=False, return_tensors="pt", tokenize=True,
                                              return_dict=True)
    assert ours.input_ids.tolist() == theirs["input_ids"].tolist()
    assert (ours.pixel_values - theirs["pixel_values"]).abs().max().item() <= 1e-6
    text = tokenizer.decode([i for i in ours.input_ids[0].tolist() if i != SOFT], skip_special_tokens=False)
    marks = [text.index(s) for s in ("You are an instructor", *(f"SLICE {n}" for n in range(1, 7)), "Based on")]
    assert marks == sorted(marks) and text.count("<start_of_image>") == 6  # instruction, slices in order, question
    assert "<end_of_image>\n\nSLICE 1\n\n<start_of_image>" in text  # each label right after its slice
    assert int((ours.input_ids == SOFT).sum()) == 6 * 256


def test_random_multimodal_model_logits_on_a_ct_prompt_match_transformers(
        ct_folder, tiny_medgemma, tiny_pipe, make_hf_processor, gemma3_chat_template):
    """A small random model (Gemma's vocabulary, a 28 px SigLIP, 4 tokens an image) read by medgem and by
    transformers from one checkpoint; a 4B-shaped one does not fit the test budget in fp32 on 2 cores
    (benchmarks/volume.py runs 4B shapes)."""
    from transformers import Gemma3ForConditionalGeneration

    pipe = tiny_pipe
    prompt = pipe.recipe_prompt("ct", QUESTION, source=ct_folder, max_new_tokens=8)
    ours = pipe.processor.apply_chat_template(prompt.messages)
    hf = make_hf_processor(tiny_medgemma, size=28, tokens_per_image=4, chat_template=gemma3_chat_template)
    theirs = hf.apply_chat_template(prompt.messages, add_generation_prompt=True, return_tensors="pt",
                                    tokenize=True, return_dict=True)
    assert ours.input_ids.tolist() == theirs["input_ids"].tolist()
    ref = Gemma3ForConditionalGeneration.from_pretrained(tiny_medgemma, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids=theirs["input_ids"], pixel_values=theirs["pixel_values"],
                       token_type_ids=theirs["token_type_ids"]).logits
        got = pipe.model(ours.input_ids, ours.pixel_values)
    assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-4
    answer = pipe.ask("ct", QUESTION, source=ct_folder, max_new_tokens=3)
    assert answer.prompt.volume.total == 6 and answer.completion.prompt_tokens == ours.input_ids.shape[1]


def test_a_recipe_too_big_for_the_context_is_refused_before_decoding(tmp_path, series_writer, tiny_pipe):
    paths = series_writer(tmp_path, 30)
    for path in paths.values():  # pixel data cut short: decoding any slice would fail
        path.write_bytes(path.read_bytes()[:-4000])
    pipe = tiny_pipe
    with pytest.raises(ContextLengthError, match=r"30 image\(s\) x 4 tokens = 120 image tokens .* more than the "
                       r"256 tokens available"):
        pipe.recipe_prompt("ct", QUESTION, source=tmp_path)
    with pytest.raises(InputError, match="truncated or corrupt"):  # what decoding would have said
        pipe.recipe_prompt("ct", QUESTION, source=tmp_path, max_slices=2, max_new_tokens=8)


def test_a_recipe_needing_more_memory_than_available_is_refused_before_decoding(tmp_path, series_writer, tiny_pipe,
                                                                                 monkeypatch):
    from medgem.engine.cache import KVCache
    from medgem.pipeline import available_memory

    paths = series_writer(tmp_path, 3)
    for path in paths.values():  # decoding any slice would fail: the refusal comes first
        path.write_bytes(path.read_bytes()[:-4000])
    room, source = available_memory()
    assert room > 0 and source  # the machine's own number (psutil / cgroup)
    monkeypatch.setenv("MEDGEM_MEMORY_LIMIT", "64M")  # less than this test process already holds
    with pytest.raises(InputError, match=r"needs about [0-9.]+ GB of memory beyond the [0-9.]+ GB of loaded weights "
                       r"\(vision tower [0-9.]+ GB for 3 image\(s\), KV cache [0-9.]+ GB for [0-9,]+ tokens, prefill "
                       r"[0-9.]+ GB\), more than the 0.00 GB left under MEDGEM_MEMORY_LIMIT") as info:
        tiny_pipe.recipe_prompt("ct", QUESTION, source=tmp_path, max_new_tokens=8)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("MEDGEM_MEMORY_LIMIT", "lots")
    with pytest.raises(medgem.errors.ConfigError, match="not a size such as 8G"):
        tiny_pipe.recipe_prompt("ct", QUESTION, source=tmp_path, max_new_tokens=8)
    # The KV part is what the engine allocates, to the byte.
    cache = KVCache(tiny_pipe.config, 1, 300)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v, layer.pos,
                                                                                       layer.groups))
    assert tiny_pipe.memory_estimate(3, 300).kv_cache == allocated


def test_memory_estimate_of_an_85_slice_ct_at_medgemma_4b_shapes():
    """The numbers a 4B user would see (meta tensors: nothing allocated): weights 8.6 GB in bfloat16; the
    85 slices cost a few GB, not 85 x the tower's activations, since the tower takes 8 images at a time."""
    from medgem.nn.medgemma import Gemma3Multimodal
    from medgem.pipeline import Pipeline
    from medgem.processing.images import ImageProcessor

    cfg = MULTIMODAL_PRESETS["4b"]
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Gemma3Multimodal(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = Pipeline.__new__(Pipeline)
    pipe.model, pipe.config = model, cfg.text
    pipe.processor = MultimodalProcessor(None, ImageProcessor(), cfg.mm_tokens_per_image, cfg.image_token_id)
    est = pipe.memory_estimate(85, 85 * 264 + 256)
    assert 8.0e9 < est.weights < 9.0e9 and 1.0e9 < est.vision < 3.0e9 and 0.4e9 < est.kv_cache < 0.8e9
    assert est.extra < 4e9


def _dated_ct(path, date: str, offset: int) -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = copy.deepcopy(ds)
    ds.PixelData = (ds.pixel_array + offset).astype(ds.pixel_array.dtype).tobytes()
    ds.AcquisitionDate, ds.AcquisitionTime = date, "101500"
    ds.save_as(path)
    return str(path)


def test_longitudinal_order_follows_the_dicom_dates(tmp_path):
    early = _dated_ct(tmp_path / "a", "20200105", 0)
    late = _dated_ct(tmp_path / "b", "20240105", 400)
    for prior, current in ((early, late), (late, early)):
        prompt = build("longitudinal", None, prior=prior, current=current)
        first, second, text = prompt.messages[0]["content"]
        assert np.array_equal(np.asarray(first["image"]), np.asarray(load_image(early)))
        assert np.array_equal(np.asarray(second["image"]), np.asarray(load_image(late)))
        assert text["type"] == "text" and text["text"].startswith("Provide a comparison of these two images")
        assert bool(prompt.notes) == (prior == late)
    png = tmp_path / "x.png"
    load_image(late).save(png)
    kept = build("longitudinal", "Compare.", prior=str(png), current=early)  # one undated: order as given
    assert np.array_equal(np.asarray(kept.messages[0]["content"][0]["image"]), np.asarray(load_image(str(png))))


def test_recipe_misuse_is_a_one_line_error(tmp_path):
    for kwargs, message in [
        (dict(name="xray"), "unknown recipe 'xray'"),
        (dict(name="ct"), "needs a series folder"),
        (dict(name="longitudinal", prior="a.png"), "needs a prior and a current image"),
        (dict(name="localize", source="a.png"), "needs an image and the name of what to find"),
        (dict(name="localize", source="a.png", question="lung", instruction="x"), "takes no instruction"),
    ]:
        with pytest.raises(InputError, match=message):
            build(**kwargs)
