"""Our Gemma tokenizer against transformers' tokenizer for the same GGUF, and the chat format."""

from __future__ import annotations

import itertools

import pytest

from medgem.errors import InputError
from medgem.processing.tokenizer import render_chat

MEDICAL = [
    "pneumothorax", "Pneumonoultramicroscopicsilicovolcanoconiosis", "HbA1c 7.2% (ref <5.7%)",
    "K+ 5.9 mmol/L", "eGFR 45 mL/min/1.73m²", "metformin 500 mg PO BID", "acetylsalicylic acid",
    "ST-elevation myocardial infarction (STEMI)", "T2-weighted FLAIR hyperintensity", "BI-RADS 4a",
    "CXR: no focal consolidation, no effusion.", "Hounsfield units: -1000 (air) to +3000", "q6h PRN",
    "ICD-10 E11.9", "SNOMED CT 44054006", "β-blocker", "α1-antitrypsin", "µg/kg/min", "37.8 °C", "SpO₂ 92%",
    "Lungenentzündung", "pneumonie", "неврология", "心筋梗塞", "폐렴", "التهاب رئوي", "न्यूमोनिया", "ปอดบวม",
]
UNICODE = ["naïve café", "Ångström", "ﬁ ligature", "½ tablet", "→ ← ↑", "“quoted”", "em—dash", "e\u0301",
           "\u200b zero width", "tab\tseparated", "Ω≈ç√∫"]
EMOJI = ["🫁", "🩺💊", "👩🏽‍⚕️", "❤️‍🩹", "🧬🦠", "👍🏻"]
SPACES = ["  two", "   three", "trailing   ", "\n\nnewlines\n", " \n \t mixed", "a" + " " * 31 + "b", "\r\n", "    "]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {}", "SELECT * FROM obs WHERE code='2823-3';",
        '{"resourceType": "Patient", "id": "p1"}', "<div class=\"note\">BP 120/80</div>", "x = [1, 2, 3]  # list"]
SPECIAL = ["<start_of_turn>user\nHello<end_of_turn>\n", "<bos>text", "<start_of_image>", "<end_of_image>",
           "<eos>", "<pad><unk>", "<start_of_turn>model\n", "<mask>"]


def corpus() -> list[str]:
    base = MEDICAL + UNICODE + EMOJI + SPACES + CODE + SPECIAL
    pairs = [f"{a} {b}" for a, b in itertools.islice(itertools.combinations(base, 2), 0, None, 13)]
    return base + pairs


def test_corpus_is_large_enough():
    assert len(corpus()) >= 200


@pytest.mark.slow
def test_ids_match_transformers(real_pipe, hf_reference):
    _, hf_tok = hf_reference
    mismatches = []
    for s in corpus():
        ours = real_pipe.tokenizer.encode(s, add_bos=True)
        theirs = hf_tok(s)["input_ids"]
        if ours != theirs:
            mismatches.append((s, ours, theirs))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"


def test_round_trip(real_pipe):
    tok = real_pipe.tokenizer
    for s in corpus():
        assert tok.decode(tok.encode(s, add_bos=False)) == s


def test_special_ids(real_pipe):
    tok = real_pipe.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert (tok.start_of_image_id, tok.end_of_image_id, tok.image_soft_token_id) == (255999, 256000, 262144)
    assert tok.encode("<start_of_turn>", add_bos=False) == [105]
    assert tok.decode([2, 105, 106], skip_special_tokens=True) == ""


def test_chat_template_format():
    messages = [
        {"role": "system", "content": "You are an expert radiologist."},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image"}]},
        {"role": "assistant", "content": "Clear lungs."},
        {"role": "user", "content": "Any effusion?"},
    ]
    assert render_chat(messages) == (
        "<bos><start_of_turn>user\nYou are an expert radiologist.\n\nDescribe this X-ray<start_of_image>"
        "<end_of_turn>\n<start_of_turn>model\nClear lungs.<end_of_turn>\n"
        "<start_of_turn>user\nAny effusion?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert not render_chat(messages[1:2], add_generation_prompt=False).endswith("model\n")


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "hi"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "doctor", "content": "a"}], "not user, assistant or system"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unknown content part"),
        (["just a string"], "must be an object"),
    ],
)
def test_chat_template_errors(messages, message):
    with pytest.raises(InputError, match=message):
        render_chat(messages)


def test_chat_template_matches_transformers_jinja(real_pipe, gemma3_chat_template):
    """The Gemma 3 chat template that published checkpoints ship, rendered by transformers' Jinja engine."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [
        [{"role": "user", "content": "What is a normal resting heart rate?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Define sepsis. "},
         {"role": "assistant", "content": "A dysregulated response to infection."},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}],
    ]
    for conv in conversations:
        rendered, _ = render_jinja_template([conv], chat_template=gemma3_chat_template, add_generation_prompt=True,
                                            bos_token="<bos>")
        assert real_pipe.tokenizer.apply_chat_template(conv) == rendered[0]
