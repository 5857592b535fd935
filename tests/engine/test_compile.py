"""The optional torch.compile path (`Pipeline.compile`, `--compile`): compiled generation gives the same
tokens as eager, through the plain generator and through the continuous-batching scheduler with
requests joining and leaving (dynamic batch and cache shapes)."""

from __future__ import annotations

import torch

from medgem.config import FULL, SLIDING
from medgem.engine.generate import Generator
from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Request, Scheduler

from .conftest import random_text_model, words
from .test_scheduler import drive


def test_compiled_generation_matches_eager(single_thread, make_prompts):
    model = random_text_model(5, num_hidden_layers=2, layer_types=[SLIDING, FULL])  # both kinds; quick to compile
    eager = Generator(model, model.config, words, stop_ids=(1,))
    compiled = Generator(torch.compile(model, dynamic=True), model.config, words, stop_ids=(1,))
    prompts = make_prompts([7, 30, 12], seed=4)
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 20)]
    want = eager.run(prompts, params)
    assert [c.token_ids for c in compiled.run(prompts, params)] == [c.token_ids for c in want]
    assert [c.token_ids for c in compiled.run(prompts[:1], params[:1])] == [want[0].token_ids]  # a new batch size

    requests = [Request(p, sp) for p, sp in zip(prompts, params)]
    scheduler = Scheduler(compiled, max_slots=2, max_len=128, prefill_chunk=16, prefix_cache_mb=0)
    events, _ = drive(scheduler, {0: requests[:1], 2: requests[1:]})
    for request, reference in zip(requests, want):
        assert events[request.request_id][-1].completion.token_ids == reference.token_ids
