"""The official `openai` client, unchanged, against a real server with the embedded Gemma 3 270M.

Answers are compared with the pipeline called directly (greedy decoding is deterministic), so a
server that drops, duplicates or reorders tokens fails, as does wrong usage accounting.
"""

from __future__ import annotations

import openai
import pytest

MODEL = "gemma-3-270m"
QUESTION = [{"role": "user", "content": "What is the most common cause of community-acquired pneumonia?"}]
PROMPT = "The three layers of the heart wall are the"


@pytest.fixture(scope="module")
def client(text_server):
    return openai.OpenAI(base_url=f"{text_server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "medgem"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_matches_the_pipeline_with_usage(client, real_pipe):
    expected = real_pipe.complete([QUESTION], max_new_tokens=8)[0]
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text and expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(real_pipe.prompt_ids(QUESTION)) == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer arrived in one piece, not streamed"
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_match_the_pipeline(client, real_pipe):
    expected = real_pipe.complete([PROMPT], raw=True, max_new_tokens=10)[0]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(real_pipe.tokenizer.encode(PROMPT)) and reply.usage.completion_tokens == 10
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_stop_sequences_cut_the_answer(client, real_pipe):
    full = real_pipe.complete([PROMPT], raw=True, max_new_tokens=12)[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]  # a stop string from the middle of the greedy answer
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      stop=[stop, "never-appears"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[: full.index(stop)]
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stop="\n")
    assert "\n" not in chat.choices[0].message.content


def test_n_choices_are_seeded_and_counted(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=1.0, seed=11, n=2)
    reply = client.chat.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1]
    texts = [c.message.content for c in reply.choices]
    assert texts[0] != texts[1], "choices should be sampled with different seeds"
    assert reply.usage.completion_tokens == 12  # 6 per choice: the base model never stops this early
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts  # seeded
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == texts


def test_reasoning_switch_on_a_model_without_thinking_mode(client):
    with pytest.raises(openai.BadRequestError, match="no thinking mode"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"reasoning": True})
    with pytest.raises(openai.BadRequestError, match="no thinking mode"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, reasoning_effort="high")
    off = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                         extra_body={"reasoning": False})
    assert off.choices[0].message.content and off.usage.completion_tokens == 2
