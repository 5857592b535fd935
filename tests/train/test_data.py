"""SFT data: label masking checked token by token, image expansion, packing, padding and bad lines."""

from __future__ import annotations

import json

import pytest
from pydicom.data import get_testdata_file

import medgem
from medgem.errors import CapabilityError, InputError
from medgem.processing.tokenizer import render_chat
from medgem.train.data import IGNORE, Encoder, collate, pack, read_jsonl

from .conftest import colour_rows, write_jsonl

CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Is aspirin an NSAID?"},
    {"role": "assistant", "content": "Yes"},
    {"role": "user", "content": "And paracetamol?"},
    {"role": "assistant", "content": "No, it is not."},
]


@pytest.fixture(scope="module")
def text_pipe(tiny_text_dir):
    return medgem.load(tiny_text_dir, dtype="float32", quant="none")


@pytest.fixture(scope="module")
def mm_pipe(tiny_mm_dir):
    return medgem.load(tiny_mm_dir, dtype="float32", quant="none")


def test_chat_labels_cover_exactly_the_assistant_turns(text_pipe, tmp_path):
    tok = text_pipe.tokenizer
    ex = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), Encoder(tok), 4096)[0]
    # The ids are the chat template's text, token for token (up to the newline after the last turn).
    assert ex.input_ids == tok.encode(render_chat(CHAT, add_generation_prompt=False).removesuffix("\n"), add_bos=False)
    # Expected mask, built independently: a token is labelled iff it lies inside "<answer><end_of_turn>"
    # of an assistant turn. Walk the ids, tracking which turn each token belongs to.
    expected, in_model_turn, after_header = [], False, False
    for i, t in enumerate(ex.input_ids):
        if t == tok.start_of_turn_id:
            in_model_turn = tok.decode(ex.input_ids[i + 1:i + 2]) == "model"
            after_header = False
            expected.append(False)
            continue
        if in_model_turn and not after_header:
            after_header = tok.decode([t]).endswith("\n")  # "model" then "\n": the header ends
            expected.append(False)
            continue
        expected.append(in_model_turn)
        if t == tok.end_of_turn_id:
            in_model_turn = False
    assert [label != IGNORE for label in ex.labels] == expected
    assert all(label in (IGNORE, t) for label, t in zip(ex.labels, ex.input_ids))
    runs = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
    assert runs == "Yes<end_of_turn>No, it is not.<end_of_turn>"


def test_prompt_completion_trains_the_completion_and_eos(text_pipe, tmp_path):
    tok = text_pipe.tokenizer
    ex = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: 2+2?\nAnswer:", "completion": " 4\n"}]),
                    Encoder(tok), 4096)[0]
    n_prompt = len(tok.encode("Question: 2+2?\nAnswer:", add_bos=True))
    assert ex.input_ids[:n_prompt] == tok.encode("Question: 2+2?\nAnswer:", add_bos=True)
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] == tok.encode(" 4\n", add_bos=False) + [tok.eos_id]


def test_image_tokens_are_never_labelled(mm_pipe, tmp_path):
    """<start_of_image>, soft tokens and padding carry no label; the DICOM and PNG images both load."""
    rows = colour_rows(tmp_path / "img", 2, seed=0)
    rows[1]["messages"][0]["content"][0]["image"] = get_testdata_file("CT_small.dcm")  # a real DICOM, absolute path
    # An image inside an assistant turn too, to see that its tokens are masked even there.
    rows[0]["messages"][1]["content"] = [{"type": "text", "text": "red, like"}, {"type": "image", "image": rows[0]["messages"][0]["content"][0]["image"]}]
    encoder = Encoder(mm_pipe.tokenizer, mm_pipe.processor)
    examples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), encoder, 4096)
    tok, image_id = mm_pipe.tokenizer, mm_pipe.processor.image_token_id
    masked_always = {tok.start_of_image_id, image_id, tok.pad_id}
    for ex in examples:
        assert sum(t == image_id for t in ex.input_ids) == 4 * len(ex.images)
        for t, label in zip(ex.input_ids, ex.labels):
            if t in masked_always:
                assert label == IGNORE
    labelled = tok.decode([t for t, lab in zip(examples[0].input_ids, examples[0].labels) if lab != IGNORE])
    assert labelled.startswith("red, like") and labelled.endswith("<end_of_image>\n\n<end_of_turn>")
    batch = collate(examples, tok.pad_id, encoder)
    assert batch.pixel_values.shape == (3, 3, 28, 28)  # three images in reading order
    short = min(len(e) for e in examples)
    assert (batch.positions[examples.index(min(examples, key=len)), short:] == -1).all()
    assert (batch.labels[batch.input_ids == tok.pad_id] == IGNORE).all()


def test_packing_keeps_every_token_and_label(text_pipe, tmp_path):
    from .conftest import arithmetic_rows

    examples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(10)), Encoder(text_pipe.tokenizer), 4096)
    lengths = [len(e) for e in examples]
    rows = pack([e for e in examples], max_len=3 * max(lengths))
    assert len(rows) < len(examples) and all(len(r) <= 3 * max(lengths) for r in rows)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)
    assert sum(r.n_labels for r in rows) == sum(e.n_labels for e in examples)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"text": "no shape"}), "line 2: a line needs 'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "line 2: the conversation has no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}), "line 2: message 1: roles must alternate"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                              {"role": "assistant", "content": "a"}]}), "line 2: image file not found"),
    (json.dumps([1, 2]), "line 2: expected a JSON object"),
])
def test_bad_lines_name_their_number(text_pipe, tmp_path, line, message):
    good = json.dumps({"prompt": "p", "completion": " c"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(InputError, match=message):
        read_jsonl(path, Encoder(text_pipe.tokenizer), 4096)


def test_images_on_a_text_model_are_a_capability_error(text_pipe, tmp_path):
    rows = colour_rows(tmp_path / "img", 1, seed=0)
    with pytest.raises(CapabilityError, match="line 1: the data has images but the model has no vision tower"):
        read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), Encoder(text_pipe.tokenizer), 4096)


def test_too_long_examples_are_skipped_and_all_too_long_is_an_error(text_pipe, tmp_path, caplog):
    rows = [{"prompt": "word " * 50, "completion": " x"}, {"prompt": "short", "completion": " y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(read_jsonl(path, Encoder(text_pipe.tokenizer), 20)) == 1
    assert "skipped 1 example(s) longer than max_len=20" in caplog.text
    with pytest.raises(InputError, match="no usable examples"):
        read_jsonl(path, Encoder(text_pipe.tokenizer), 3)
