"""The optional torch.compile path (`Pipeline.compile`, `--compile`, engine/compiled.py): compiled
generation gives the same tokens as eager, through the plain generator and through the
continuous-batching scheduler with requests joining and leaving (dynamic batch and cache shapes), for
a float and an int8 model; and two compiled models in one process never share compiled code (the
compiled path skips guards on the model's modules)."""

from __future__ import annotations

from medgem.config import FULL, SLIDING
from medgem.engine.compiled import compile_decoder
from medgem.engine.generate import Generator
from medgem.engine.quant import quantize_text_model
from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Request, Scheduler

from .conftest import random_text_model, words
from .test_scheduler import drive


def test_compiled_generation_matches_eager(single_thread, make_prompts):
    model = random_text_model(5, num_hidden_layers=2, layer_types=[SLIDING, FULL])  # both kinds; quick to compile
    generator = Generator(model, model.config, words, stop_ids=(1,))
    prompts = make_prompts([7, 30, 12], seed=4)
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 20)]
    want = generator.run(prompts, params)
    compile_decoder(model)
    assert [c.token_ids for c in generator.run(prompts, params)] == [c.token_ids for c in want]
    assert [c.token_ids for c in generator.run(prompts[:1], params[:1])] == [want[0].token_ids]  # a new batch size

    requests = [Request(p, sp) for p, sp in zip(prompts, params)]
    scheduler = Scheduler(generator, max_slots=2, max_len=128, prefill_chunk=16, prefix_cache_mb=0)
    events, _ = drive(scheduler, {0: requests[:1], 2: requests[1:]})
    for request, reference in zip(requests, want):
        assert events[request.request_id][-1].completion.token_ids == reference.token_ids


def test_two_compiled_models_keep_their_own_code(single_thread, make_prompts):
    """Another architecture (window, GQA, layer count) and int8 weights with fused projections, compiled
    in the same process: each gives its own eager tokens, before and after the other ran."""
    a = random_text_model(6, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    b = quantize_text_model(random_text_model(7, num_hidden_layers=3, layer_types=[SLIDING, SLIDING, FULL],
                                              sliding_window=4, num_key_value_heads=1), "int8")
    prompts = make_prompts([9, 14], seed=8)
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 2
    generators = [Generator(m, m.config, words, stop_ids=(1,)) for m in (a, b)]
    want = [[c.token_ids for c in g.run(prompts, params)] for g in generators]
    for model in (a, b):
        compile_decoder(model)
    for g, w in [*zip(generators, want), *zip(generators, want)]:
        assert [c.token_ids for c in g.run(prompts, params)] == w


def test_floats_compile_as_constants_without_a_restart(single_thread, make_prompts):
    """Norm eps and attention scale are constants of the graph: left symbolic, dynamo traced every graph
    twice (it restarts to turn them into tensors), which tripled compile time on the 270M."""
    from torch._dynamo.utils import counters

    model = random_text_model(5, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    generator = Generator(model, model.config, words, stop_ids=(1,))
    compile_decoder(model)
    counters.clear()
    generator.run(make_prompts([6], seed=3), [SamplingParams(max_new_tokens=3)])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert counters["aot_autograd"]["total"] == graphs  # each graph traced once
