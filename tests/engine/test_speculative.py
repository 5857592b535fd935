"""Speculative decoding: greedy text equals plain greedy text whatever the drafter (a draft model or
prompt lookup); the acceptance rule keeps the target's sampling distribution; seeded sampling with a
draft is reproducible."""

from __future__ import annotations

import pytest
import torch

from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Engine, Request, Scheduler
from medgem.engine.speculative import Drafter, PromptLookup, accept, distribution
from medgem.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def run_all(scheduler: Scheduler, requests: list[Request]) -> list:
    """Requests join two steps apart; returns their completions."""
    done = {}
    for step in range(5000):
        if step % 2 == 0 and step // 2 < len(requests):
            scheduler.add(requests[step // 2])
        done.update({e.request_id: e.completion for e in scheduler.step() if e.done})
        if len(done) == len(requests) and not scheduler.busy:
            return [done[r.request_id] for r in requests]
    raise AssertionError("the scheduler did not finish")


def noisy_copy(generator, std: float):
    """The target with noise on its weights: a draft that agrees often, but not always."""
    import copy

    model = copy.deepcopy(generator.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std * p.std())
    return model


@pytest.mark.parametrize("draft_kind", ["different model", "noisy copy", "the target itself"])
def test_speculative_greedy_equals_plain_greedy(tiny_target, make_text_generator, make_prompts, draft_kind):
    if draft_kind == "different model":  # fewer, narrower layers and another window, same vocabulary
        draft = make_text_generator(5, num_hidden_layers=3, hidden_size=32, sliding_window=4).model
    elif draft_kind == "noisy copy":
        draft = noisy_copy(tiny_target, 0.3)
    else:
        draft = tiny_target.model
    prompts = make_prompts([5, 40, 17, 90, 33], seed=11)
    prompts.append(prompts[3][:40] + prompts[0])  # reuses the target's and the draft's cached prefix
    params = [SamplingParams(max_new_tokens=n, repetition_penalty=r)
              for n, r in ((24, 1.0), (13, 1.3), (30, 1.0), (9, 1.0), (20, 1.0), (12, 1.0))]
    drafter = Drafter(draft, k=3)
    scheduler = Scheduler(tiny_target, max_slots=3, max_len=200, prefill_chunk=16, prefix_block=4, draft=drafter)
    completions = run_all(scheduler, [Request(p, sp) for p, sp in zip(prompts, params)])
    for prompt, sp, got in zip(prompts, params, completions):
        assert got.token_ids == tiny_target.run([prompt], [sp])[0].token_ids
    assert scheduler.metrics()["prefix_cache_hit_tokens"] == 40
    rate = drafter.accepted / drafter.proposed
    assert {"different model": rate < 0.5, "noisy copy": 0.2 < rate < 0.95, "the target itself": rate > 0.95}[draft_kind]


def test_acceptance_rule_keeps_the_target_distribution():
    """Draw drafts from q, run the rule, and compare the emitted tokens' frequencies with p."""
    g = torch.Generator().manual_seed(0)
    vocab, trials = 6, 20_000
    params = SamplingParams(temperature=0.8, top_k=5)
    target = torch.randn(3, vocab, generator=g) * 2  # logits for 2 drafts + the bonus position
    draft = torch.randn(2, vocab, generator=g) * 2
    seen = torch.tensor([], dtype=torch.long)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        d1 = int(torch.multinomial(q1 := distribution(draft[0], params, seen), 1, generator=g))
        d2 = int(torch.multinomial(q2 := distribution(draft[1], params, seen), 1, generator=g))
        out = accept(target, [d1, d2], [q1, q2], params, seen, g)
        first[out[0]] += 1
        if out[0] == 0:  # given the first token, the second follows p at the next position
            second[out[1]] += 1
    assert (first / trials - distribution(target[0], params, seen)).abs().max() < 0.015
    assert (second / second.sum() - distribution(target[1], params, seen)).abs().max() < 0.03


def test_prompt_lookup_copies_what_followed_the_longest_recent_match():
    look = PromptLookup(k=3, max_ngram=2)

    def propose(slot, tokens):
        return look.propose([(slot, tokens, SamplingParams(), torch.tensor(tokens), None)])[0][0]

    assert propose(0, [5, 6, 7, 8, 9, 6, 7]) == [8, 9, 6]  # "6 7" occurred before: what followed it
    assert propose(0, [5, 6, 7, 8, 9, 6, 7, 1, 9]) == [6, 7, 1]  # indexed incrementally; "9" last seen at 4
    assert propose(0, [5, 6, 7, 8, 9, 6, 7, 1, 9, 4]) == []  # 4 never occurred before
    assert propose(0, [5, 6, 7, 8, 9, 6, 7, 1, 9, 4, 6, 7]) == [1, 9, 4]  # the latest "6 7" wins
    assert propose(1, [3, 3]) == [3]  # the continuation may be the sequence's own last token
    look.free(0)
    assert propose(0, [1, 2, 1]) == [2, 1]  # a freed slot's new sequence starts a new index
    assert look.proposed == 12
    look.rollback(0, 4, accepted=0)  # slow start: after a miss one token, then 2 * hits + 1, at most k
    assert propose(0, [1, 2, 1, 3, 1, 2, 1, 3, 1]) == [2]
    look.rollback(0, 10, accepted=1)
    assert propose(0, [1, 2, 1, 3, 1, 2, 1, 3, 1, 2]) == [1, 3, 1]
    look.rollback(0, 14, accepted=3)
    assert propose(0, [1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 2]) == [1, 3, 1]  # 7 allowed, k = 3
    with pytest.raises(ConfigError, match="k >= 1"):
        PromptLookup(k=0)


def test_prompt_lookup_keeps_greedy_text(tiny_target, make_prompts):
    """Prompts x + (the target's greedy continuation of x) + x, so lookup drafts and the target often
    agrees; one prompt with nothing to copy; a repetition penalty that makes drafts wrong. Requests join
    and leave, rows with drafts of different lengths share steps. The text is always plain greedy's."""
    xs = make_prompts([12, 30, 9], seed=21)
    echo = [x + tiny_target.run([x], [SamplingParams(max_new_tokens=20)])[0].token_ids + x for x in xs]
    prompts = [echo[0], echo[1], make_prompts([15], seed=22)[0], echo[2]]
    params = [SamplingParams(max_new_tokens=n, repetition_penalty=r)
              for n, r in ((20, 1.0), (31, 1.3), (12, 1.0), (25, 1.0))]
    look = PromptLookup(k=4)
    scheduler = Scheduler(tiny_target, max_slots=2, max_len=200, prefill_chunk=16, prefix_block=4, draft=look)
    completions = run_all(scheduler, [Request(p, sp) for p, sp in zip(prompts, params)])
    for prompt, sp, got in zip(prompts, params, completions):
        assert got.token_ids == tiny_target.run([prompt], [sp])[0].token_ids
    assert 0 < look.accepted < look.proposed
    assert look._slots == {}  # every finished request freed its slot's state


def test_a_certain_draft_keeps_the_target_distribution():
    """Prompt lookup's drafts are certain (q one-hot): the emitted token must still follow p."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=1.0)
    target = torch.randn(2, 5, generator=g)
    seen = torch.tensor([], dtype=torch.long)
    look = PromptLookup(k=1)
    drafts, probs = look.propose([(0, [3, 1, 3], params, seen, g)])
    assert drafts == [[1]] and probs[0][0].tolist() == [0.0, 1.0]
    counts = torch.zeros(5)
    for _ in range(20_000):
        counts[accept(target, drafts[0], probs[0], params, seen, g)[0]] += 1
    assert (counts / counts.sum() - distribution(target[0], params, seen)).abs().max() < 0.015


def test_speculative_sampling_is_seeded(tiny_target, make_text_generator, make_prompts):
    draft = make_text_generator(5, num_hidden_layers=2).model
    (prompt,) = make_prompts([12], seed=12)

    def sample(seed):
        scheduler = Scheduler(tiny_target, max_slots=1, max_len=64, draft=Drafter(draft, k=2))
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed)
        return run_all(scheduler, [Request(prompt, params)])[0].token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_a_draft_must_be_a_gemma_decoder():
    with pytest.raises(ConfigError, match="at least 1"):
        Drafter(torch.nn.Linear(2, 2), k=0)
    linear = torch.nn.Linear(2, 2)
    linear.config = None
    with pytest.raises(ConfigError, match="Gemma 3 decoder"):
        Drafter(linear)


@pytest.mark.slow
def test_real_model_drafting_for_itself_keeps_greedy_text(real_pipe):
    prompts = ["The most common symptoms of community-acquired pneumonia are", "Type 2 diabetes mellitus is"]
    params = SamplingParams(max_new_tokens=16)
    ids = [real_pipe.tokenizer.encode(p) for p in prompts]
    drafter = Drafter(real_pipe.model, k=4)
    with Engine.from_pipeline(real_pipe, max_slots=2, max_len=128, draft=drafter) as engine:
        streams = [engine.stream(Request(i, params)) for i in ids]
        got = [[e for e in s][-1].completion.token_ids for s in streams]
    assert got == [real_pipe.engine.run([i], [params])[0].token_ids for i in ids]
    assert drafter.accepted >= 0.9 * drafter.proposed


@pytest.mark.slow
def test_pipeline_with_a_draft_keeps_greedy_text(real_pipe):
    """`use_draft` (the --draft flag): the fp32 270M checked by itself with an int4 draft; the draft's
    guesses differ now and then, the text never does, in complete() and in stream()."""
    import medgem
    from medgem.errors import InputError
    from medgem.pipeline import Pipeline

    target = Pipeline(real_pipe.model, real_pipe.tokenizer, real_pipe.config, "target")  # not the shared one
    prompts = ["Sepsis is defined as", "The first-line treatment of anaphylaxis is"]
    plain = [c.token_ids for c in target.complete(prompts, raw=True, max_new_tokens=24, temperature=0)]
    target.use_draft(medgem.load(quant="int4"), k=3)
    try:
        drafted = target.complete(prompts, raw=True, max_new_tokens=24, temperature=0)
        assert [c.token_ids for c in drafted] == plain
        assert "".join(target.stream(prompts[0], raw=True, max_new_tokens=24, temperature=0)) == drafted[0].text
        stats = target._speculative.metrics()
        assert 0 < stats["draft_tokens_accepted"] <= stats["draft_tokens_proposed"]
    finally:
        target.close()  # its model thread shares the session's model with later tests
    other = Pipeline(real_pipe.model, real_pipe.tokenizer, real_pipe.config, "other")
    other.tokenizer = type(real_pipe.tokenizer).__new__(type(real_pipe.tokenizer))
    other.tokenizer.__dict__.update(real_pipe.tokenizer.__dict__, encode=lambda text, add_bos=True: [2, 5])
    with pytest.raises(InputError, match="does not share this model's tokenizer"):
        target.use_draft(other)


@pytest.mark.slow
def test_pipeline_with_prompt_lookup_keeps_greedy_text(real_pipe):
    """`use_prompt_lookup` (--draft lookup) on the real 270M: a summary-style prompt that the answer quotes,
    so drafts are accepted; the text is the plain greedy text."""
    from medgem.pipeline import Pipeline

    target = Pipeline(real_pipe.model, real_pipe.tokenizer, real_pipe.config, "target")
    prompt = ("Note: chest radiograph shows consolidation of the right lower lobe with a small effusion. "
              "Impression: consolidation of the")
    plain = target.complete([prompt], raw=True, max_new_tokens=32, temperature=0)[0]
    target.use_prompt_lookup(k=6)
    try:
        looked = target.complete([prompt], raw=True, max_new_tokens=32, temperature=0)[0]
        assert looked.token_ids == plain.token_ids
        stats = target._speculative.metrics()
        assert 0 < stats["draft_tokens_accepted"] <= stats["draft_tokens_proposed"]
    finally:
        target.close()
