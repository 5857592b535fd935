"""The embedded Gemma 3 270M (real weights) against transformers' load of the same GGUF, and the
generation engine's behaviours on it: batching, streaming, stop strings, sampling, limits."""

from __future__ import annotations

import pytest
import torch

from medgem.errors import ContextLengthError, InputError

PROMPTS = [
    "The most common symptoms of community-acquired pneumonia are",
    "Type 2 diabetes mellitus is treated first with",
    "A chest X-ray of a patient with a pneumothorax shows",
]


@pytest.mark.slow
def test_first_step_logits_match_transformers(real_pipe, hf_reference):
    hf_model, _ = hf_reference
    for prompt in PROMPTS:
        ids = torch.tensor([real_pipe.tokenizer.encode(prompt)])
        with torch.no_grad():
            ours = real_pipe.model(ids)[0, -1]
            theirs = hf_model(ids).logits[0, -1].float()
        relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert relative <= 1e-3, f"{prompt!r}: relative logit error {relative:.2e}"


@pytest.mark.slow
def test_greedy_continuations_match_transformers(real_pipe, hf_reference):
    hf_model, _ = hf_reference
    for prompt in PROMPTS:
        ids = real_pipe.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
        ours = real_pipe.complete([prompt], raw=True, max_new_tokens=48)[0]
        assert ours.token_ids == ref[: len(ours.token_ids)]
        assert len(ours.token_ids) == 48 or ref[len(ours.token_ids)] in real_pipe.tokenizer.stop_ids


def test_batched_equals_unbatched(real_pipe):
    prompts = [PROMPTS[0], "Aspirin", "Sepsis is defined as life-threatening organ dysfunction caused by a"]
    alone = [real_pipe.complete([p], raw=True, max_new_tokens=16)[0].token_ids for p in prompts]
    batched = [c.token_ids for c in real_pipe.complete(prompts, raw=True, max_new_tokens=16)]
    assert batched == alone


def test_stream_joins_to_the_full_text(real_pipe):
    pieces = list(real_pipe.stream(PROMPTS[0], raw=True, max_new_tokens=30))
    assert len(pieces) > 5
    assert "".join(pieces) == real_pipe.generate(PROMPTS[0], raw=True, max_new_tokens=30)
    assert real_pipe.last_completion.completion_tokens == 30


def test_stop_string_cuts_text(real_pipe):
    full = real_pipe.generate(PROMPTS[0], raw=True, max_new_tokens=30)
    stop = full.strip().split()[3]
    cut = real_pipe.complete([PROMPTS[0]], raw=True, max_new_tokens=30, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.startswith(cut.text)
    streamed = "".join(real_pipe.stream(PROMPTS[0], raw=True, max_new_tokens=30, stop=[stop]))
    assert streamed == cut.text


def test_sampling_is_seeded_and_varies(real_pipe):
    kw = dict(raw=True, max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50)
    a = real_pipe.generate(PROMPTS[1], seed=1, **kw)
    assert a == real_pipe.generate(PROMPTS[1], seed=1, **kw)
    assert len({a, *(real_pipe.generate(PROMPTS[1], seed=s, **kw) for s in (2, 3))}) > 1
    # a seeded sample is the same alone and inside a batch
    batch = real_pipe.generate_batch([PROMPTS[0], PROMPTS[1]], seed=1, **kw)
    assert batch[1] == a


def test_min_p_and_repetition_penalty_change_output(real_pipe):
    plain = real_pipe.generate("List: a, b, c, a, b, c,", raw=True, max_new_tokens=16)
    penalised = real_pipe.generate("List: a, b, c, a, b, c,", raw=True, max_new_tokens=16, repetition_penalty=1.8)
    assert plain != penalised
    near_greedy = real_pipe.generate(PROMPTS[2], raw=True, max_new_tokens=12, temperature=1.0, min_p=0.999, seed=3)
    assert near_greedy == real_pipe.generate(PROMPTS[2], raw=True, max_new_tokens=12)


def test_chat_prompt_ends_at_end_of_turn(real_pipe):
    c = real_pipe.complete([[{"role": "user", "content": "Say hello."}]], max_new_tokens=40)[0]
    assert c.prompt_tokens > 5 and "<end_of_turn>" not in c.text


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompt=""), InputError, "empty"),
        (dict(prompt="   "), InputError, "empty"),
        (dict(prompt="hi", max_new_tokens=-1), InputError, "max_new_tokens"),
        (dict(prompt="hi", max_new_tokens=0), InputError, "max_new_tokens"),
        (dict(prompt="hi", temperature=-0.5), InputError, "temperature"),
        (dict(prompt="hi", top_p=0), InputError, "top_p"),
        (dict(prompt=42), InputError, "string or a list"),
    ],
)
def test_bad_generation_input(real_pipe, kwargs, error, message):
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=message):
        real_pipe.generate(prompt, raw=True, **kwargs)


def test_prompt_over_context(real_pipe):
    long_prompt = "cardiology " * (real_pipe.config.max_position_embeddings + 10)
    with pytest.raises(ContextLengthError, match="context is 32768 tokens"):
        real_pipe.generate(long_prompt, raw=True, max_new_tokens=4)


def test_images_need_a_vision_tower(real_pipe):
    from medgem.errors import CapabilityError

    with pytest.raises(CapabilityError, match="no vision tower"):
        real_pipe.generate([{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                         {"type": "text", "text": "Describe"}]}])


def test_score_batches_options_and_matches_one_at_a_time(real_pipe):
    """score() runs every option in one padded batch; each sum equals scoring that option alone."""
    prompt = "Question: Which organ produces insulin?\nAnswer:"
    options = [" The pancreas", " The liver", " The spleen and the gallbladder together"]
    context = real_pipe.tokenizer.encode(prompt, add_bos=True)
    alone = []
    with torch.inference_mode():
        for option in options:
            ids = real_pipe.tokenizer.encode(option, add_bos=False)
            logprobs = torch.log_softmax(real_pipe.model(torch.tensor([context + ids]))[0, len(context) - 1:-1], -1)
            alone.append(float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum()))
    assert real_pipe.score(prompt, options) == pytest.approx(alone, abs=1e-3)
    assert alone[0] > alone[1]  # the real model knows this one
    with pytest.raises(InputError, match="option is empty"):
        real_pipe.score(prompt, ["yes", ""])
