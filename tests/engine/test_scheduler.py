"""Continuous batching: every request gets the text it gets alone, whoever joins or leaves meanwhile;
long prompts are chunked between decode steps; cancellation frees the slot; prefix caching reuses
KV without changing the output; the async and blocking APIs; limits and errors."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Engine, QueueFullError, Request, Scheduler
from medgem.errors import CapabilityError, ContextLengthError, InputError

IMAGE_ID = 512  # tiny_multimodal's soft-token id (tests/engine/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def drive(scheduler: Scheduler, arrivals: dict[int, list[Request]], cancels: dict[int, list[str]] | None = None,
          max_steps: int = 2000) -> tuple[dict, list[list]]:
    """Step until every request ended; requests join at their step. Returns (events by request, events by step)."""
    by_request: dict[str, list] = {}
    by_step: list[list] = []
    expected = sum(map(len, arrivals.values()))
    for step in range(max_steps):
        for request in arrivals.get(step, []):
            scheduler.add(request)
        for request_id in (cancels or {}).get(step, []):
            scheduler.cancel(request_id)
        events = scheduler.step()
        by_step.append(events)
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        if sum(bool(e) and e[-1].done for e in by_request.values()) == expected and not scheduler.busy:
            return by_request, by_step
    raise AssertionError("the scheduler did not finish")


def alone(generator, prompt, params, extra=None):
    return generator.run([prompt], [params], extra)[0]


def test_each_request_gets_its_solo_text_while_others_join_and_leave(tiny_target, make_prompts):
    # Prompts longer than the window (8) and the chunk (16), budgets that end at different steps,
    # more requests than slots (slots are reused), one seeded sampler among greedy rows.
    prompts = make_prompts([5, 40, 17, 3, 90, 33, 60])
    params = [SamplingParams(max_new_tokens=n) for n in (20, 12, 30, 8, 25, 16, 10)]
    params[2] = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=40, seed=7)
    requests = [Request(p, sp) for p, sp in zip(prompts, params)]
    scheduler = Scheduler(tiny_target, max_slots=3, max_len=200, prefill_chunk=16, prefix_cache_mb=0)
    events, _ = drive(scheduler, {3 * i: [r] for i, r in enumerate(requests)})
    for request in requests:
        got = events[request.request_id][-1].completion
        want = alone(tiny_target, request.prompt, request.params)
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
        assert "".join(e.text for e in events[request.request_id]) == got.text
        assert [t for e in events[request.request_id] for t in e.token_ids] == got.token_ids
    metrics = scheduler.metrics()
    assert metrics["free_slots"] == 3 and metrics["requests_finished"] == len(requests)
    assert metrics["generated_tokens"] == sum(len(events[r.request_id][-1].completion.token_ids) for r in requests)


def test_a_long_prompt_does_not_stall_running_streams(tiny_target, make_prompts):
    short, long, other = make_prompts([6, 200, 9], seed=2)
    scheduler = Scheduler(tiny_target, max_slots=3, max_len=256, prefill_chunk=16, prefix_cache_mb=0)
    first = Request(short, SamplingParams(max_new_tokens=40))
    late = Request(long, SamplingParams(max_new_tokens=4))
    during = Request(other, SamplingParams(max_new_tokens=3))
    events, by_step = drive(scheduler, {0: [first], 3: [late], 6: [during]})
    # The long prompt takes ceil(200 / 16) = 13 prefill chunks, one per step, plus one step in which
    # the short prompt arriving meanwhile goes first; the running stream gets a token in every step.
    prefill_steps = range(3, 3 + 14)
    tokens = [sum(len(e.token_ids) for e in by_step[s] if e.request_id == first.request_id) for s in prefill_steps]
    assert tokens == [1] * 14
    assert any(e.request_id == during.request_id and e.token_ids for e in by_step[6])
    assert not any(e.request_id == late.request_id for s in prefill_steps[:-1] for e in by_step[s])
    for r in (first, late, during):
        assert events[r.request_id][-1].completion.token_ids == alone(tiny_target, r.prompt, r.params).token_ids


def test_short_prompts_arriving_together_share_one_prefill_forward(tiny_target, make_prompts):
    prompts = make_prompts([7, 12, 5, 30], seed=8)
    scheduler = Scheduler(tiny_target, max_slots=4, max_len=128, prefill_chunk=40, prefix_cache_mb=0)
    requests = [Request(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    events, by_step = drive(scheduler, {0: requests})
    # 3 rows x 12 tokens fit in 40; adding the 30-token prompt would not (4 x 30), so it runs next step
    assert {e.request_id for e in by_step[0]} == {r.request_id for r in requests[:3]}
    assert {e.request_id for e in by_step[1]} == {r.request_id for r in requests}
    for r in requests:
        assert events[r.request_id][-1].completion.token_ids == alone(tiny_target, r.prompt, r.params).token_ids


def test_cancellation_frees_the_slot(tiny_target, make_prompts):
    a, b, c = make_prompts([12, 7, 9], seed=3)
    scheduler = Scheduler(tiny_target, max_slots=1, max_len=128, prefix_cache_mb=0)
    running = Request(a, SamplingParams(max_new_tokens=100))
    waiting = Request(b, SamplingParams(max_new_tokens=5))
    queued_then_cancelled = Request(c, SamplingParams(max_new_tokens=5))
    events, _ = drive(scheduler, {0: [running, waiting, queued_then_cancelled]},
                      {1: [queued_then_cancelled.request_id], 4: [running.request_id]})
    cancelled = events[running.request_id][-1].completion
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.token_ids) < 100
    assert events[queued_then_cancelled.request_id][-1].completion.finish_reason == "cancelled"
    # the waiting request took the freed slot and is unaffected by what the slot held before
    assert events[waiting.request_id][-1].completion.token_ids == alone(tiny_target, b, waiting.params).token_ids
    metrics = scheduler.metrics()
    assert metrics["requests_cancelled"] == 2 and metrics["free_slots"] == 1 and metrics["queue_depth"] == 0


def test_drive_runs_in_the_calling_thread_and_closing_it_cancels(tiny_target, make_prompts):
    """`Scheduler.drive` (what Pipeline uses): no model thread; each request gets its solo greedy text;
    leaving the loop early frees every slot at once."""
    import threading

    prompts = make_prompts([9, 31, 14], seed=5)
    params = SamplingParams(max_new_tokens=12)
    scheduler = Scheduler(tiny_target, max_slots=2, max_len=128, prefill_chunk=16)
    threads = threading.active_count()
    requests = [Request(p, params) for p in prompts]
    done = {e.request_id: e.completion for e in scheduler.drive(requests) if e.done}
    assert threading.active_count() == threads
    for prompt, request in zip(prompts, requests):
        assert done[request.request_id].token_ids == tiny_target.run([prompt], [params])[0].token_ids
    events = scheduler.drive([Request(p, SamplingParams(max_new_tokens=50)) for p in prompts])
    next(event for event in events if event.token_ids)
    events.close()
    metrics = scheduler.metrics()
    assert not scheduler.busy and metrics["free_slots"] == 2 and metrics["requests_cancelled"] == 3


def test_limits_and_bad_requests(tiny_target, tiny_multimodal, make_prompts):
    scheduler = Scheduler(tiny_target, max_slots=1, max_len=64, max_queue=1, prefix_cache_mb=0)
    (prompt,) = make_prompts([10])
    scheduler.add(Request(prompt))  # takes the slot at the next step
    scheduler.add(Request(prompt))  # waits
    with pytest.raises(QueueFullError, match="retry later") as full:
        scheduler.add(Request(prompt))
    assert full.value.http_status == 429 and scheduler.metrics()["requests_rejected"] == 1
    with pytest.raises(InputError, match="empty"):
        scheduler.add(Request([]))
    with pytest.raises(ContextLengthError, match="64 tokens"):
        scheduler.add(Request(list(range(3, 70))))
    with pytest.raises(InputError, match="sliding window"):
        Scheduler(tiny_target, prefix_block=9)  # a block must fit in the window to be saved whole
    with pytest.raises(InputError, match="vocabulary of 512"):
        scheduler.add(Request([5, 512, 6]))
    with pytest.raises(CapabilityError):
        scheduler.add(Request(prompt, pixel_values=torch.zeros(1, 3, 28, 28)))
    # a budget past the slot's length ends with "length" where the slot is full
    scheduler = Scheduler(tiny_target, max_slots=1, max_len=64, prefix_cache_mb=0)
    events, _ = drive(scheduler, {0: [(r := Request(prompt[:3] * 18, SamplingParams(max_new_tokens=500)))]})
    done = events[r.request_id][-1].completion
    assert done.finish_reason in ("length", "stop") and len(done.token_ids) <= 64 - 54
    # an image count that does not match the prompt fails that request only, as an event
    multimodal = Scheduler(tiny_multimodal, max_slots=2, max_len=64)
    bad = Request([5, *[IMAGE_ID] * 4, 6], pixel_values=torch.zeros(2, 3, 28, 28))
    odd = Request([5, *[IMAGE_ID] * 4, 6], pixel_values=torch.zeros(1, 3, 20, 28))  # not the tower's size
    good = Request([5, 6, 7], SamplingParams(max_new_tokens=3))
    events, _ = drive(multimodal, {0: [bad, odd, good]})
    assert isinstance(events[bad.request_id][-1].error, InputError)
    assert isinstance(events[odd.request_id][-1].error, InputError)
    assert events[good.request_id][-1].completion.token_ids == alone(tiny_multimodal, good.prompt, good.params).token_ids


def test_prefix_cache_reuses_a_shared_prefix(tiny_target, make_prompts):
    system, tail_a, tail_b = make_prompts([45, 9, 14], seed=4)
    prompts = [system + tail_a, system + tail_b, system + tail_a]
    params = SamplingParams(max_new_tokens=12)
    scheduler = Scheduler(tiny_target, max_slots=2, max_len=128, prefill_chunk=16, prefix_block=8)
    requests = [Request(p, params) for p in prompts]
    events, _ = drive(scheduler, {0: [requests[0]], 10: [requests[1]], 20: [requests[2]]})
    for request in requests:
        assert events[request.request_id][-1].completion.token_ids == alone(tiny_target, request.prompt, params).token_ids
    # second: the 40 tokens of the system prompt's whole blocks; third: 48 of its 54 (one token is always run)
    assert scheduler.metrics()["prefix_cache_hit_tokens"] == 40 + 48


def test_prefix_cache_tells_images_apart(tiny_multimodal):
    image = [IMAGE_ID] * 4
    # chunks of 5 end before the first image (3..6); the second (14..17) straddles block boundary 16
    prompt = [5, 9, 8, *image, 7, 11, 12, 13, 14, 15, 16, *image, 10]
    g = torch.Generator().manual_seed(0)
    pixels, other = torch.randn(2, 3, 28, 28, generator=g), torch.randn(2, 3, 28, 28, generator=g)
    params = SamplingParams(max_new_tokens=8)
    scheduler = Scheduler(tiny_multimodal, max_slots=1, max_len=64, prefill_chunk=5, prefix_block=4)
    requests = [Request(prompt, params, pixel_values=px) for px in (pixels, other, pixels)]
    events, _ = drive(scheduler, {0: requests})
    outputs = [events[r.request_id][-1].completion.token_ids for r in requests]
    for r, out in zip(requests, outputs):
        assert out == alone(tiny_multimodal, prompt, params, {"pixel_values": r.pixel_values}).token_ids
    assert outputs[0] != outputs[1]  # the images matter...
    # ...so the second request reuses nothing (block 0 shows its first image); the third reuses three
    # blocks: 4 would end inside its second image
    assert scheduler.metrics()["prefix_cache_hit_tokens"] == 0 + 12


def test_async_api_streams_cancels_and_refuses(tiny_target, make_prompts):
    prompts = make_prompts([8, 30, 15, 4], seed=5)
    params = SamplingParams(max_new_tokens=15)
    expected = [alone(tiny_target, p, params).text for p in prompts]

    async def collect(engine, prompt):
        pieces = []
        async for event in engine.submit(Request(prompt, params)):
            pieces.append(event.text)
            if event.done:
                assert event.completion.text == "".join(pieces)
                return event.completion.text

    async def cancel_midway(engine, prompt):
        async with engine.submit(Request(prompt, SamplingParams(max_new_tokens=200))) as stream:
            async for event in stream:
                if event.token_ids:
                    break

    async def main():
        with Engine(Scheduler(tiny_target, max_slots=2, max_len=256, max_queue=8)) as engine:
            texts = await asyncio.gather(*(collect(engine, p) for p in prompts))
            await cancel_midway(engine, prompts[0])
            for _ in range(200):
                if engine.metrics()["free_slots"] == 2:
                    break
                await asyncio.sleep(0.01)
            return texts, engine.metrics()

    texts, metrics = asyncio.run(main())
    assert texts == expected
    assert metrics["free_slots"] == 2 and metrics["requests_cancelled"] == 1 and metrics["running"] == 0


def test_blocking_api_and_queue_full(tiny_target, make_prompts):
    a, b = make_prompts([6, 11], seed=6)
    params = SamplingParams(max_new_tokens=10)
    with Engine(Scheduler(tiny_target, max_slots=1, max_len=128, max_queue=0)) as engine:
        assert engine.complete(Request(a, params)).token_ids == alone(tiny_target, a, params).token_ids
        stream = engine.stream(Request(b, SamplingParams(max_new_tokens=300)))
        next(stream)
        with pytest.raises(QueueFullError):  # the slot is busy and no request may wait
            engine.stream(Request(a, params))
        stream.close()  # closing the iterator cancels the request and frees the slot
        while engine.metrics()["free_slots"] == 0:
            time.sleep(0.01)
        assert engine.complete(Request(b, params)).token_ids == alone(tiny_target, b, params).token_ids
        assert engine.metrics()["requests_cancelled"] == 1


@pytest.mark.slow
def test_real_model_batches_like_it_runs_alone(real_pipe):
    prompts = ["The most common symptoms of community-acquired pneumonia are", "Aspirin",
               "Sepsis is defined as life-threatening organ dysfunction caused by a"]
    params = SamplingParams(max_new_tokens=12)
    ids = [real_pipe.tokenizer.encode(p) for p in prompts]
    with Engine.from_pipeline(real_pipe, max_slots=2, max_len=256) as engine:
        streams = [engine.stream(Request(i, params)) for i in ids]  # the third waits for a free slot
        got = [[e for e in s][-1].completion.token_ids for s in streams]
    assert got == [real_pipe.engine.run([i], [params])[0].token_ids for i in ids]
