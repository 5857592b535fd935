"""Continuous batching: requests join and leave the running batch at every step.

The static `Generator` (engine/generate.py) runs one batch from start to end. A server cannot wait for
that: requests arrive while others decode. Here every request owns a slot of a per-slot KV cache
(engine/slots.py). Each `Scheduler.step()` does three things:
- it admits waiting requests into free slots, reusing cached prompt prefixes (engine/prefix_cache.py);
- it runs one decode forward over every decoding row, with a draft model when one is given
  (engine/speculative.py);
- it runs one prefill forward of at most `prefill_chunk` tokens: a chunk of one long prompt, or
  several short prompts side by side.
So a 2,000-token prompt delays running streams by one chunk per step, never by its whole prefill.
The shortest remaining prompt goes first, which keeps time-to-first-token low; a prompt passed over
`MAX_SKIPS` times goes next, so none starves. A finished or cancelled request frees its slot at once.

API, for the server and the CLI:

    from medgem.engine.scheduler import Engine, Request
    engine = Engine.from_pipeline(pipe, max_slots=8)      # Scheduler(...) options; starts a model thread
    engine = Engine.from_pipeline(pipe, draft=Drafter(draft_pipe.model, k=4))   # --draft (same tokenizer)
    # asyncio (the server): submit() raises QueueFullError (http_status 429), ContextLengthError or
    # InputError at once, before any event
    stream = engine.submit(Request(prompt_ids, SamplingParams(...), pixel_values=None))
    async for event in stream:                           # Event: request_id, text, token_ids, done,
        ...                                              #   completion (a Completion, on the last event)
    stream.cancel()             # or `async with engine.submit(...) as stream:`, or cancel the task
    # a request that fails later (bad pixels, a broken step) raises its MedgemError from the iterator;
    # EngineError (http_status 500) when the model loop itself failed or shut down
    # blocking callers:
    for event in engine.stream(request): ...             # closing the iterator cancels the request
    completion = engine.complete(request)
    engine.metrics()            # queue_depth, running, prefilling, free_slots, token and request counters
    engine.close()              # or `with Engine(...) as engine:`

`Scheduler` is the single-threaded core (add / cancel / step / metrics) that `Engine` drives from one
thread. Tests drive it step by step. Torch releases the GIL in its kernels, so the event loop stays
responsive while the model thread computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from medgem.engine.generate import Completion, Generator, _Seq, image_progress
from medgem.engine.logits import TokenLogprob, token_logprob
from medgem.engine.prefix_cache import PrefixCache, block_keys
from medgem.engine.sampling import SamplingParams
from medgem.engine.slots import SlotModel
from medgem.engine.speculative import Drafter, accept
from medgem.errors import CapabilityError, ContextLengthError, InputError, MedgemError

log = logging.getLogger(__name__)

MAX_SKIPS = 4  # prefill chunks a prompt may be passed over for shorter ones before it goes next
PREFIX_BLOCK = 64  # tokens per prefix-cache block (fewer when the sliding window is shorter)


class QueueFullError(MedgemError):
    """Every slot is busy and the waiting queue is at its bound: retry later."""

    http_status = 429


class EngineError(MedgemError):
    """The model loop failed or shut down; the request cannot finish."""

    http_status = 500


@dataclass
class Request:
    prompt: list[int]  # token ids, images expanded to their soft tokens (processing/)
    params: SamplingParams = field(default_factory=SamplingParams)
    pixel_values: torch.Tensor | None = None  # the prompt's images, in order, for a multimodal model
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_logprobs: int | None = None  # n: each prompt token's logprob (after the first) and the top n


@dataclass
class Event:
    """What one step produced for one request."""

    request_id: str
    text: str  # new text since the previous event (held back while it may still become a stop string)
    token_ids: list[int]  # tokens sampled since the previous event
    done: bool = False
    completion: Completion | None = None  # on the last event; finish_reason "stop", "length" or "cancelled"
    error: MedgemError | None = None  # set on a last event when the request failed
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked for them


@dataclass
class _Row:
    """A request in a slot: prefilling while cursor < prompt length, then decoding."""

    request: Request
    slot: int
    seq: _Seq
    inputs: torch.Tensor  # prompt ids [T], or embeddings [T, hidden] for a model with prepare_embeds
    groups: torch.Tensor  # [T] image-group ids
    keys: list[bytes]  # prefix-cache block keys of the prompt
    started: float
    cursor: int = 0  # prompt tokens in the cache
    skipped: int = 0
    first_token: float | None = None
    logprobs_sent: int = 0  # of seq.logprobs, already in events
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asks for them

    @property
    def decoding(self) -> bool:
        return self.cursor >= self.seq.prompt_len


def _span_end(groups: torch.Tensor, start: int, size: int) -> int:
    """End of the prefill chunk at `start`: at most `size` tokens, never half an image.

    An image that does not fit starts the next chunk; an image longer than `size` is a chunk of its
    own. Group ids name the column where their image starts (nn/medgemma.py `image_groups`).
    """
    end = min(start + size, groups.shape[0])
    if not _splits_image(groups, end):
        return end
    image_start = int(groups[end])
    if image_start > start:
        return image_start
    return int((groups == image_start).nonzero().max()) + 1


def _splits_image(groups: torch.Tensor, at: int) -> bool:
    return 0 < at < groups.shape[0] and int(groups[at]) >= 0 and int(groups[at]) == int(groups[at - 1])


def _new_generator(p: SamplingParams) -> torch.Generator | None:
    if p.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(p.seed if p.seed is not None else int(torch.seed() % (2**63)))
    return gen


class Scheduler:
    """Slots, a waiting queue and the step loop around one model (and an optional draft model).

    generator: the pipeline's `Generator`, for its model, stop ids, pad id and text decoding.
    max_len: tokens per slot (prompt + generated); longer prompts raise ContextLengthError.
    max_queue: requests that may wait while every slot is taken; more raise QueueFullError.
    prefix_cache_mb: byte budget of the prefix cache (0 turns it off).
    prefix_block: tokens per prefix-cache block (default PREFIX_BLOCK, at most the sliding window).
    draft: a `Drafter` for speculative decoding.
    """

    def __init__(self, generator: Generator, *, max_slots: int = 8, max_len: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache_mb: int = 256, prefix_block: int | None = None,
                 draft: Drafter | None = None):
        if max_slots < 1 or max_queue < 0 or prefill_chunk < 1 or max_len < 2:
            raise InputError("max_slots and prefill_chunk must be >= 1, max_queue >= 0 and max_len >= 2")
        self.generator, self.model = generator, generator.model
        self.max_len = min(max_len, generator.max_context)
        self.max_slots, self.max_queue, self.prefill_chunk = max_slots, max_queue, prefill_chunk
        self.draft = draft
        self.model_config = getattr(self.model, "config", None)
        image_tokens = getattr(self.model_config, "mm_tokens_per_image", 0)
        spec = draft.k + 1 if draft else 0
        slack = max(prefill_chunk, image_tokens, spec)  # most tokens one step feeds to one slot
        self.target = SlotModel(self.model, generator.text_config, max_slots, self.max_len + spec, slack)
        budget = prefix_cache_mb * 2**20
        window = min([generator.text_config.sliding_window] + ([draft.config.sliding_window] if draft and draft.config else []))
        prefix_block = min(PREFIX_BLOCK, window) if prefix_block is None else prefix_block
        if budget > 0 and not 1 <= prefix_block <= window:  # a block is saved while its tokens are in the ring
            raise InputError(f"prefix_block must be between 1 and the sliding window ({window} tokens)")

        def prefix() -> PrefixCache | None:
            return PrefixCache(prefix_block, budget) if budget > 0 else None

        self.prefix = prefix()
        if draft:
            draft.bind(max_slots, self.max_len + spec, slack, prefix())
        self._lock = threading.Lock()  # guards _waiting and _cancelled, which other threads touch
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._rows: dict[int, _Row] = {}
        self.counters = dict.fromkeys(
            ("requests_submitted", "requests_finished", "requests_cancelled", "requests_rejected",
             "requests_failed", "prompt_tokens", "generated_tokens", "steps"), 0)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> Scheduler:
        return cls(pipe.engine, **kwargs)

    # -- called from any thread -----------------------------------------------------------------------
    def add(self, request: Request) -> str:
        """Queue a request; raises at once if it can never run or the queue is full."""
        n = len(request.prompt)
        if n == 0:
            raise InputError("prompt is empty")
        if n >= self.max_len:
            raise ContextLengthError(f"prompt has {n} tokens; this engine holds {self.max_len} tokens per request")
        if request.pixel_values is not None and not hasattr(self.model, "prepare_embeds"):
            raise CapabilityError("this model has no vision tower, so it cannot read images")
        vocab, image_id = self.generator.text_config.vocab_size, getattr(self.model_config, "image_token_id", -1)
        if any(not 0 <= t < vocab and t != image_id for t in request.prompt):
            raise InputError(f"prompt holds a token id outside the model's vocabulary of {vocab}")
        with self._lock:
            if len(self._waiting) >= self.max_queue + self.max_slots - len(self._rows):
                self.counters["requests_rejected"] += 1
                raise QueueFullError(
                    f"the engine is busy: all {self.max_slots} slots are taken and {self.max_queue} requests "
                    "wait; retry later")
            self._waiting.append(request)
            self.counters["requests_submitted"] += 1
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step, freeing its slot (a no-op once it has finished)."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting or self._cancelled)

    def metrics(self) -> dict[str, int | float]:
        """A snapshot for the server's /metrics: gauges, then monotonically growing counters."""
        rows = list(self._rows.values())
        out: dict[str, int | float] = {
            "queue_depth": len(self._waiting),
            "running": sum(r.decoding for r in rows),
            "prefilling": sum(not r.decoding for r in rows),
            "free_slots": self.max_slots - len(rows),
            "max_slots": self.max_slots,
            **self.counters,
        }
        if self.prefix:
            out.update(prefix_cache_hit_tokens=self.prefix.hit_tokens, prefix_cache_bytes=self.prefix.bytes)
        if self.draft:
            out.update(draft_tokens_proposed=self.draft.proposed, draft_tokens_accepted=self.draft.accepted)
        return out

    # -- the model thread -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit, decode one token (or one speculative round) for every decoding row, prefill one forward."""
        events: list[Event] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for request in [r for r in self._waiting if r.request_id in cancelled]:
                self._waiting.remove(request)
                self.counters["requests_cancelled"] += 1
                events.append(self._final(request.request_id, Completion("", [], len(request.prompt), "cancelled")))
            free = sorted(set(range(self.max_slots)) - set(self._rows))
            admitted = [(self._waiting.popleft(), slot) for slot in free if self._waiting]
        for row in [r for r in self._rows.values() if r.request.request_id in cancelled]:
            self.counters["requests_cancelled"] += 1
            self._finish(row, "cancelled", events)
        for request, slot in admitted:
            try:
                self._rows[slot] = self._admit(request, slot)
            except (MedgemError, RuntimeError, ValueError) as exc:  # e.g. pixels of the wrong shape
                error = exc if isinstance(exc, MedgemError) else InputError(
                    f"the request's inputs could not be prepared ({type(exc).__name__})")
                self.counters["requests_failed"] += 1
                self.target.cache.free(slot)
                if self.draft:
                    self.draft.free(slot)
                events.append(Event(request.request_id, "", [], True, error=error))
        decoding = sorted((r for r in self._rows.values() if r.decoding), key=lambda r: r.slot)
        if decoding:
            (self._speculate if self.draft else self._decode)(decoding, events)
        prefilling = [r for r in self._rows.values() if not r.decoding]
        if prefilling:
            self._prefill(self._plan_prefill(prefilling), events)
        self.counters["steps"] += 1
        return events

    def drive(self, requests: list[Request]) -> Iterator[Event]:
        """Run requests to their end in the calling thread, yielding their events (Pipeline's way in).

        No model thread (BENCHMARKS.md, prompt lookup): on 2 cores, decoding in a second thread ran 7-12 %
        slower than in the thread that had already computed (loaded the model, allocated the cache), and
        that thread slowed by as much while the second one existed. libgomp gives each computing thread
        its own OpenMP team and, with more team threads than cores, spins only briefly between parallel
        regions; `GOMP_SPINCOUNT=1000` alone reproduces the slowdown. Closing the iterator early cancels
        what is still running and frees its slots. The scheduler must be idle: the caller owns it until
        the iterator ends (another caller's events would be dropped here).
        """
        if self.busy:
            raise EngineError("the scheduler is already running requests; drive() needs it to itself")
        pending: set[str] = set()
        try:
            for request in requests:
                pending.add(self.add(request))
            while pending:
                try:
                    events = self.step()
                except Exception as exc:  # a broken step: end every request, never leave slots taken
                    self.abort(EngineError(f"generation failed ({type(exc).__name__})"))
                    raise
                for event in events:
                    if event.request_id not in pending:
                        continue
                    if event.done:
                        pending.discard(event.request_id)
                    if event.error is not None:
                        raise event.error
                    yield event
        finally:
            for request_id in pending:
                self.cancel(request_id)
            while self.busy:  # process the cancellations now, not at someone else's next request
                self.step()

    def abort(self, error: MedgemError) -> list[Event]:
        """Fail every request (the model loop broke or shuts down) and free every slot."""
        with self._lock:
            ids = [r.request_id for r in self._waiting] + [r.request.request_id for r in self._rows.values()]
            self._waiting.clear()
            self._cancelled.clear()
        for slot in list(self._rows):
            self._free(slot)
        self.counters["requests_failed"] += len(ids)
        return [Event(rid, "", [], True, error=error) for rid in ids]

    def _admit(self, request: Request, slot: int) -> _Row:
        ids = torch.tensor(request.prompt, dtype=torch.long)
        if hasattr(self.model, "prepare_embeds"):
            with image_progress(request.pixel_values) as on_image:
                embeds, groups = self.model.prepare_embeds(ids[None].to(self.target.device),
                                                           pixel_values=request.pixel_values, on_image=on_image)
            inputs, groups = embeds[0], groups[0].cpu()
        else:
            inputs, groups = ids, torch.full_like(ids, -1)
        n = len(request.prompt)
        params = replace(request.params, max_new_tokens=min(request.params.max_new_tokens, self.max_len - n))
        row = _Row(request, slot, _Seq(params, n, _new_generator(params), ids), inputs, groups, [],
                   time.perf_counter())
        if self.prefix and request.prompt_logprobs is None:  # prompt logprobs need every prompt position run
            block = self.prefix.block
            row.keys = block_keys(request.prompt, groups, request.pixel_values, block)
            usable = (n - 1) // block  # the last prompt token is always computed: its logits are needed
            while usable and _splits_image(groups, usable * block):
                usable -= 1
            hit = self.prefix.match(row.keys[:usable])
            if self.draft and self.draft.prefix:
                hit = min(hit, self.draft.prefix.match(row.keys[:hit]))
                self.draft.prefix.load(self.draft.lane.cache, slot, row.keys[:hit])
            row.cursor = self.prefix.load(self.target.cache, slot, row.keys[:hit])
        self.counters["prompt_tokens"] += n
        log.debug("admitted request %s into slot %d (%d prompt tokens, %d cached)", request.request_id, slot, n,
                  row.cursor)
        return row

    def _plan_prefill(self, prefilling: list[_Row]) -> list[tuple[_Row, int, int]]:
        """(row, start, end) chunks for one forward over slots lo..hi, each row's chunk left-padded to
        the longest. Rows go shortest remaining prompt first (a row passed over MAX_SKIPS times goes
        first), while the padded area rows x longest chunk stays within `prefill_chunk` tokens."""
        order = sorted(prefilling, key=lambda r: (r.skipped < MAX_SKIPS, r.seq.prompt_len - r.cursor, r.started))
        plan: list[tuple[_Row, int, int]] = []
        for row in order:
            end = _span_end(row.groups, row.cursor, self.prefill_chunk)
            if plan:
                slots = [r.slot for r, _, _ in plan] + [row.slot]
                width = max(end - row.cursor, *(e - s for _, s, e in plan))
                if (max(slots) - min(slots) + 1) * width > self.prefill_chunk:
                    continue
            plan.append((row, row.cursor, end))
        for row in prefilling:
            row.skipped = 0 if any(row is r for r, _, _ in plan) else row.skipped + 1
        return plan

    def _prefill(self, plan: list[tuple[_Row, int, int]], events: list[Event]) -> None:
        lo, hi = min(r.slot for r, _, _ in plan), max(r.slot for r, _, _ in plan) + 1
        width = max(end - start for _, start, end in plan)
        positions = torch.full((hi - lo, width), -1, dtype=torch.long)
        groups = torch.full((hi - lo, width), -1, dtype=torch.long)
        first = plan[0][0].inputs
        inputs = (torch.zeros(hi - lo, width, first.shape[-1], dtype=first.dtype, device=first.device)
                  if first.dim() == 2 else torch.full((hi - lo, width), self.generator.pad_id, dtype=torch.long))
        for row, start, end in plan:
            i, n = row.slot - lo, end - start
            positions[i, width - n:] = torch.arange(start, end)
            groups[i, width - n:] = row.groups[start:end]
            inputs[i, width - n:] = row.inputs[start:end]
        embedded = first.dim() == 2
        scored = [(row, start, end) for row, start, end in plan if row.request.prompt_logprobs is not None]
        hidden = self.target.hidden(slice(lo, hi), positions, ids=None if embedded else inputs,
                                    embeds=inputs if embedded else None, groups=groups, last_only=not scored)
        for row, start, end in scored:
            self._score_prompt(row, hidden[row.slot - lo, width - (end - start):], start, end)
        for row, start, end in plan:
            row.cursor = end
            if self.prefix:
                self.prefix.save(self.target.cache, row.slot, row.keys, start, end)
            if self.draft:
                self.draft.prefill(row.slot, row.request.prompt, end)
                if self.draft.prefix:
                    self.draft.prefix.save(self.draft.lane.cache, row.slot, row.keys, start, end)
        done = [row for row, _, _ in plan if row.decoding]
        if done:
            logits = self.target.logits(hidden[[row.slot - lo for row in done], -1])
            for row, row_logits in zip(done, logits):
                row.first_token = time.perf_counter()
                self._emit(row, [row.seq.choose(row_logits)], events, row_logits[None])

    def _score_prompt(self, row: _Row, hidden: torch.Tensor, start: int, end: int) -> None:
        """Logprobs of prompt tokens start+1..end (the ones these positions predict), a few rows at a time:
        a 262k-wide row of fp32 logits is 1 MB."""
        prompt, top = row.request.prompt, row.request.prompt_logprobs
        for a in range(start, min(end, len(prompt) - 1), 32):
            b = min(a + 32, end, len(prompt) - 1)
            logits = self.target.logits(hidden[a - start:b - start])
            row.prompt_logprobs += [token_logprob(lg, prompt[p + 1], top) for p, lg in zip(range(a, b), logits)]

    def _decode(self, rows: list[_Row], events: list[Event]) -> None:
        """One token for every decoding row, in one forward over slots 0..hi (idle slots are padding)."""
        hi = rows[-1].slot + 1
        ids = torch.full((hi, 1), self.generator.pad_id, dtype=torch.long)
        positions = torch.full((hi, 1), -1, dtype=torch.long)
        for r in rows:
            ids[r.slot, 0] = r.seq.ids[-1]  # the newest token, sampled but not yet fed
            positions[r.slot, 0] = self.target.cache.lengths[r.slot]
        hidden = self.target.hidden(slice(0, hi), positions, ids=ids)
        logits = self.target.logits(hidden[[r.slot for r in rows], -1])
        for r, row_logits in zip(rows, logits):
            self._emit(r, [r.seq.choose(row_logits)], events, row_logits[None])

    def _speculate(self, rows: list[_Row], events: list[Event]) -> None:
        """Draft up to k tokens per row, verify all rows' [newest, drafts] in one target forward (shorter
        drafts right-padded), keep the accepted."""
        draft = self.draft
        drafts, probs = draft.propose([(r.slot, r.request.prompt + r.seq.ids, r.seq.params, r.seq.seen,
                                        r.seq.generator) for r in rows])
        hi, width = rows[-1].slot + 1, 1 + max(map(len, drafts))
        ids = torch.full((hi, width), self.generator.pad_id, dtype=torch.long)
        positions = torch.full((hi, width), -1, dtype=torch.long)
        lengths = {r.slot: self.target.cache.lengths[r.slot] for r in rows}
        for r, d in zip(rows, drafts):
            ids[r.slot, :1 + len(d)] = torch.tensor([r.seq.ids[-1], *d])
            positions[r.slot, :1 + len(d)] = torch.arange(lengths[r.slot], lengths[r.slot] + 1 + len(d))
        hidden = self.target.hidden(slice(0, hi), positions, ids=ids)
        logits = self.target.logits(hidden[[r.slot for r in rows]])
        for r, row_logits, d, q in zip(rows, logits, drafts, probs):
            out = accept(r.seq.adjusted(row_logits, d), d, q, r.seq.params, r.seq.seen, r.seq.generator)
            kept = lengths[r.slot] + len(out)  # the newest token and the accepted drafts are now fed
            self.target.cache.truncate(r.slot, kept)
            draft.rollback(r.slot, kept, len(out) - 1)
            self._emit(r, out, events, row_logits)

    def _emit(self, row: _Row, tokens: list[int], events: list[Event], logits: torch.Tensor) -> None:
        """Record sampled tokens (stop handling and text as in the Generator) and report what changed.
        logits: the raw logits each token was chosen from [>= len(tokens), V]."""
        seq, before, text = row.seq, len(row.seq.ids), []
        for tok, tok_logits in zip(tokens, logits):
            event = self.generator._advance(0, seq, tok, tok_logits)
            if event is not None:
                text.append(event.text)
            if seq.done:
                break
        self.counters["generated_tokens"] += len(seq.ids) - before
        new = seq.ids[before:]
        if seq.done:
            self.counters["requests_finished"] += 1
            self._finish(row, seq.finish_reason, events, "".join(text), new)
        elif text:
            events.append(Event(row.request.request_id, "".join(text), new, logprobs=self._unsent_logprobs(row)))

    @staticmethod
    def _unsent_logprobs(row: _Row) -> list[TokenLogprob] | None:
        """Logprobs of the tokens since the last event (their text may have been held back)."""
        if row.seq.logprobs is None:
            return None
        sent, row.logprobs_sent = row.logprobs_sent, len(row.seq.logprobs)
        return row.seq.logprobs[sent:]

    def _finish(self, row: _Row, reason: str, events: list[Event], text: str = "", new: list[int] | None = None) -> None:
        seq, now = row.seq, time.perf_counter()
        first = row.first_token or now
        completion = Completion(seq.text, list(seq.ids), seq.prompt_len, reason, first - row.started, now - first,
                                seq.logprobs, row.prompt_logprobs if row.request.prompt_logprobs is not None else None)
        self._free(row.slot)
        events.append(self._final(row.request.request_id, completion, text, new or [], self._unsent_logprobs(row)))

    @staticmethod
    def _final(request_id: str, completion: Completion, text: str = "", new: list[int] | None = None,
               logprobs: list[TokenLogprob] | None = None) -> Event:
        return Event(request_id, text, new or [], True, completion, logprobs=logprobs)

    def _free(self, slot: int) -> None:
        del self._rows[slot]
        self.target.cache.free(slot)
        if self.draft:
            self.draft.free(slot)


class RequestStream:
    """The events of one submitted request, for `async for`. `cancel()`, leaving `async with`, or the
    consuming task being cancelled frees the request's slot."""

    def __init__(self, engine: Engine, request_id: str, events: asyncio.Queue[Event]):
        self.request_id = request_id
        self._engine, self._events, self._done = engine, events, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._done = event.done
        if event.error is not None:
            raise event.error
        return event

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class Engine:
    """A `Scheduler` stepped by one background thread, with async and blocking entry points."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._sinks: dict[str, Callable[[Event], None]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="medgem-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> Engine:
        """An engine for a loaded `medgem.Pipeline`; kwargs go to `Scheduler`."""
        return cls(Scheduler.from_pipeline(pipe, **kwargs))

    def submit(self, request: Request) -> RequestStream:
        """Queue a request from async code; iterate the returned stream for its events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                self.cancel(request.request_id)

        self._enqueue(request, sink)
        return RequestStream(self, request.request_id, events)

    def stream(self, request: Request) -> Iterator[Event]:
        """Queue a request from blocking code (raises at once); closing the iterator cancels it."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._enqueue(request, events.put)
        return self._drain(request.request_id, events)

    def _drain(self, request_id: str, events: queue.SimpleQueue[Event]) -> Iterator[Event]:
        done = False
        try:
            while not done:
                event = events.get()
                done = event.done
                if event.error is not None:
                    raise event.error
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    def complete(self, request: Request) -> Completion:
        """Run a request to its end and return its Completion."""
        for event in self.stream(request):
            if event.done:
                return event.completion  # type: ignore[return-value]
        raise EngineError("the engine stopped before the request finished")

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
        with self._wake:
            self._wake.notify()

    def metrics(self) -> dict[str, int | float]:
        return self.scheduler.metrics()

    def close(self) -> None:
        """Stop the model thread; requests still queued or running end with an EngineError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _enqueue(self, request: Request, sink: Callable[[Event], None]) -> None:
        with self._wake:
            if self._closed:
                raise EngineError("the engine has shut down")
            self._sinks[request.request_id] = sink  # before the scheduler can produce its first event
            try:
                self.scheduler.add(request)
            except MedgemError:
                del self._sinks[request.request_id]
                raise
            self._wake.notify()

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            with self._wake:
                sink = self._sinks.pop(event.request_id, None) if event.done else self._sinks.get(event.request_id)
            if sink is not None:
                sink(event)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.scheduler.busy:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                events = self.scheduler.step()
            except Exception as exc:  # noqa: BLE001 - a broken step must end every request, never hang them
                log.exception("generation step failed; failing all running requests")
                events = self.scheduler.abort(EngineError(f"generation failed ({type(exc).__name__}); see the log"))
            self._deliver(events)
        self._deliver(self.scheduler.abort(EngineError("the engine shut down before the request finished")))
