"""The server's one door to the engine: submit token ids, get each choice's events as they come.

Generation runs in the engine's continuous-batching scheduler (medgem.engine.scheduler): one model
thread, requests joining and leaving the batch at every step, a bounded waiting queue. This module
adds what an HTTP request needs on top: `n` choices as n engine requests that are admitted together
or not at all, one merged event stream, cancellation of every choice when the client goes away, and
the queue-full refusal as a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import (
    Engine,
    EngineError,
    Event,
    QueueFullError,
    Request,
    RequestStream,
    Scheduler,
)
from medgem.pipeline import Pipeline
from medgem.serve.errors import APIError
from medgem.serve.settings import ServeSettings


class Backend:
    """An `Engine` over the pipeline's model. Its decoded text keeps thought markers (the pipeline's
    decoding, processing/thinking.py), which the routes split off every answer."""

    def __init__(self, pipe: Pipeline, settings: ServeSettings):
        generator = pipe.engine
        limits = settings.limits
        self.max_slots = settings.max_batch
        draft = pipe.draft() if pipe.draft else None  # --draft: speculative decoding
        self.engine = Engine(Scheduler(generator, max_slots=settings.max_batch, max_queue=settings.max_queue,
                                       max_len=limits.max_prompt_tokens + limits.max_tokens, draft=draft))

    def metrics(self) -> dict[str, int | float]:
        return self.engine.metrics()

    def close(self) -> None:
        self.engine.close()

    def submit(self, prompts: list[tuple[list[int], torch.Tensor | None]], params: SamplingParams,
               n: int = 1, prompt_logprobs: int | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Queue n choices of each (token ids, pixel values) prompt, all or none; raises at once.
        prompt_logprobs: also score the prompt's tokens, with this many top alternatives (echo).

        Choice j of prompt i is index i * n + j, sampled with seed + j when a seed is given. The
        returned iterator yields (index, event); closing it, or cancelling its task, cancels every
        choice still running.
        """
        streams: list[RequestStream] = []
        try:
            for ids, pixel_values in prompts:
                for j in range(n):
                    seed = None if params.seed is None else params.seed + j
                    request = Request(ids, replace(params, seed=seed), pixel_values=pixel_values,
                                      prompt_logprobs=prompt_logprobs)
                    streams.append(self.engine.submit(request))
        except QueueFullError:
            for stream in streams:
                stream.cancel()
            waiting = self.engine.metrics()["queue_depth"]
            retry = str(1 + math.ceil(waiting / self.max_slots))
            raise APIError(429, "the server is busy: too many requests are waiting; retry later",
                           code="queue_full", headers={"Retry-After": retry}) from None
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return _merge(streams)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several streams as (index, event), in arrival order."""
    queue: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                if isinstance(item, EngineError):
                    raise APIError(503, "the engine stopped before the request finished",
                                   code="shutting_down") from None
                raise item
            if item.done:
                open_streams -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()
