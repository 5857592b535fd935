"""The thinking switch: which models think, the decode that keeps MedGemma's thought markers, the
splitter that routes thought and answer however the text is cut into stream pieces, and the switch
over HTTP on a model forced into thinking mode."""

from __future__ import annotations

import itertools

import openai
import pytest

from medgem.config import TEXT_PRESETS
from medgem.serve.reasoning import (
    THINKING_INSTRUCTION,
    THOUGHT_END,
    THOUGHT_START,
    ThoughtSplitter,
    model_thinks,
    thought_keeping_decode,
)
from medgem.serve.settings import ServeSettings

RAW = f"{THOUGHT_START}thought\nLeft lower lobe opacity; consider pneumonia.{THOUGHT_END}Likely pneumonia."


def split_in_pieces(text: str, cuts: tuple[int, ...]) -> tuple[str, str]:
    splitter, thought, answer = ThoughtSplitter(), [], []
    bounds = [0, *cuts, len(text)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        t, s = splitter.feed(text[a:b], final=i == len(bounds) - 2)
        thought.append(t)
        answer.append(s)
    return "".join(thought), "".join(answer)


def test_splitter_routes_thought_and_answer_wherever_the_stream_is_cut():
    expected = ("Left lower lobe opacity; consider pneumonia.", "Likely pneumonia.")
    assert split_in_pieces(RAW, ()) == expected
    for cut in range(1, len(RAW)):  # every single cut, including inside both markers and the label
        assert split_in_pieces(RAW, (cut,)) == expected, cut
    for cuts in itertools.combinations(range(1, len(RAW), 7), 3):
        assert split_in_pieces(RAW, cuts) == expected, cuts
    assert split_in_pieces("No thought at all <unused9", (5,)) == ("", "No thought at all <unused9")
    assert split_in_pieces(f"{THOUGHT_START}thought\nunfinished", (12,)) == ("unfinished", "")


def test_thought_markers_survive_decoding(real_pipe):
    tok = real_pipe.tokenizer
    ids = tok.encode(RAW, add_bos=False)
    assert tok.token_to_id(THOUGHT_START) in ids and tok.token_to_id(THOUGHT_END) in ids
    assert THOUGHT_END not in tok.decode(ids, skip_special_tokens=True)  # what ordinary decoding does
    assert thought_keeping_decode(tok)([tok.bos_id, *ids, tok.end_of_turn_id]) == RAW


def test_which_models_think():
    assert model_thinks(TEXT_PRESETS["27b"], "auto")
    assert not model_thinks(TEXT_PRESETS["4b"], "auto") and not model_thinks(TEXT_PRESETS["270m"], "auto")
    assert model_thinks(TEXT_PRESETS["270m"], "on") and not model_thinks(TEXT_PRESETS["27b"], "off")


def test_reasoning_switch_on_a_thinking_model(serve, tiny_pipe):
    settings = ServeSettings(model_name="tiny", thinking="on")
    with serve(tiny_pipe, settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Chest pain?"}], max_tokens=4, temperature=0)
        off = client.chat.completions.create(**ask)
        on = client.chat.completions.create(**ask, extra_body={"reasoning": True})
        instruction = len(tiny_pipe.tokenizer.encode(THINKING_INSTRUCTION + "\n\n", add_bos=False))
        assert on.usage.prompt_tokens == off.usage.prompt_tokens + instruction
        assert on.choices[0].message.model_extra.get("reasoning_content") is not None
        assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            **ask, extra_body={"reasoning": True}, stream=True) if c.choices)
        assert streamed == on.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="disagree"):
            client.chat.completions.create(**ask, reasoning_effort="none", extra_body={"reasoning": True})


def test_an_unasked_thought_is_reasoning_content_over_http(serve, scripted_pipe):
    """MedGemma 1.5 4B (no thinking mode) thinks unasked: the thought never reaches `content`, streamed
    or not, in chat or completions, and chat returns it as `reasoning_content`."""
    messages = [{"role": "user", "content": "Chest pain?"}]
    with serve(scripted_pipe(messages, RAW), ServeSettings(model_name="m")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model="m", messages=messages, max_tokens=64, temperature=0)
        reply = client.chat.completions.create(**ask).choices[0].message
        assert reply.content == "Likely pneumonia."
        assert reply.model_extra["reasoning_content"] == "Left lower lobe opacity; consider pneumonia."
        pieces = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        assert "".join(d.content or "" for d in pieces) == "Likely pneumonia."
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in pieces) == reply.model_extra[
            "reasoning_content"]
