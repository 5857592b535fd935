"""Batched autoregressive generation over a KV cache.

A batch of prompts is left-padded; padding gets position -1, so every sequence sees exactly what it
would see alone (the mask is built from positions). Prompts are prefilled in chunks so a long prompt
never builds a T x T mask at once; a chunk boundary never splits an image. Decoding then feeds one
token per sequence per step, with `last_only` logits so the 262k-wide LM head runs once per row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from medgem import progress
from medgem.config import TextConfig
from medgem.engine.cache import KVCache
from medgem.engine.constraints import Matcher
from medgem.engine.logits import TokenLogprob, adjust, needs_adjusting, token_logprob
from medgem.engine.sampling import SamplingParams, sample_next
from medgem.errors import ContextLengthError, InputError

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512


@dataclass
class Completion:
    """One finished sequence with its accounting (what --json and the server report)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) or "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first (scheduler)
    reasoning: str = ""  # a thought trace the pipeline split off the text (processing/thinking.py)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tok_per_s(self) -> float:
        return len(self.token_ids) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # new text since the previous event of this sequence
    done: bool = False
    completion: Completion | None = None  # set when done


@dataclass
class _Seq:
    params: SamplingParams
    prompt_len: int
    generator: torch.Generator | None
    seen: torch.Tensor
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already streamed
    done: bool = False
    finish_reason: str = "length"
    text: str = ""
    matcher: Matcher | None = None  # the grammar state of a constrained request
    logprobs: list[TokenLogprob] | None = None

    def __post_init__(self) -> None:
        if self.params.constraint is not None:
            self.matcher = self.params.constraint.matcher()
        if self.params.logprobs is not None:
            self.logprobs = []

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from the model's raw logits [V]: adjusted (engine/logits.py), then sampled.

        Greedy under a grammar alone: when the model's own choice is allowed, it is also the argmax of
        the masked logits, and checking one token costs far less than a 262k-token mask.
        """
        p = self.params
        if self.matcher is not None and p.greedy and not (p.logit_bias or p.frequency_penalty or p.presence_penalty):
            token = sample_next(logits, p, self.seen, None)
            if self.matcher.allows(token):
                return token
        if needs_adjusting(self.params, self.matcher):
            logits = adjust(logits, self.params, self.ids, self.matcher)
        return sample_next(logits, self.params, self.seen, self.generator)

    def adjusted(self, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """Adjusted logits [k + 1, V] for verifying drafts: row j as if drafts[:j] were emitted.

        The grammar walks the drafts and is rolled back after; past the first draft it refuses, rows
        keep the raw logits, which the verifier never reaches (that draft is rejected: its logit is -inf).
        """
        if not needs_adjusting(self.params, self.matcher):
            return logits
        out, generated, walked = logits.clone(), list(self.ids), 0
        for j in range(len(drafts) + 1):
            out[j] = adjust(logits[j], self.params, generated, self.matcher)
            if j == len(drafts) or out[j, drafts[j]] == float("-inf"):
                break
            if self.matcher is not None:
                if not self.matcher.accept(drafts[j]):
                    break
                walked += 1
            generated.append(drafts[j])
        if self.matcher is not None:
            self.matcher.rollback(walked)
        return out


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts, if any."""
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be streamed: hold back a tail that may still become a stop string, and an
    incomplete UTF-8 character (decoded as U+FFFD)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def _chunks(groups: torch.Tensor, length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) prefill spans of at most `size` tokens (more only to keep one image whole)."""
    spans, start = [], 0
    any_group = groups.max(dim=0).values  # [T]: an image in any row keeps that column whole
    while start < length:
        end = min(start + size, length)
        while end < length and any_group[end] >= 0 and any_group[end] == any_group[end - 1]:
            end += 1
        spans.append((start, end))
        start = end
    return spans


@contextmanager
def image_progress(pixel_values: torch.Tensor | None) -> Iterator[Callable[[], None] | None]:
    """A counted progress line while a prompt's images go through the vision tower, which takes tens of
    seconds per 896 px image on a laptop CPU (85 for a CT volume); None when there are no images."""
    if pixel_values is None:
        yield None
        return
    with progress.counted("vision tower: image", int(pixel_values.shape[0])) as tick:
        yield tick


class Generator:
    """Runs a model (anything with the nn/text.py forward signature) for a tokenizer's stop ids."""

    def __init__(self, model: torch.nn.Module, text_config: TextConfig, decode: Callable[[list[int]], str],
                 stop_ids: tuple[int, ...], pad_id: int = 0):
        self.model = model
        self.text_config = text_config
        self.decode = decode
        self.stop_ids = set(stop_ids)
        self.max_context = text_config.max_position_embeddings
        self.pad_id = pad_id

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stream(
        self, prompts: list[list[int]], params: list[SamplingParams], extra: dict | None = None
    ) -> Iterator[StreamEvent]:
        """Yields text deltas per sequence, then one final event per sequence with its Completion.

        extra: model inputs for the whole batch (e.g. pixel_values), handed to `model.prepare_embeds`.
        """
        if not prompts:
            return
        for i, ids in enumerate(prompts):
            if not ids:
                raise InputError(f"prompt {i} is empty")
            if len(ids) >= self.max_context:
                raise ContextLengthError(
                    f"prompt {i} has {len(ids)} tokens; the model's context is {self.max_context} tokens"
                )
        device = self._device()
        batch, longest = len(prompts), max(map(len, prompts))
        budget = max(p.max_new_tokens for p in params)
        budget = min(budget, self.max_context - longest)
        cache = KVCache(self.text_config, batch, longest + budget, dtype=self._dtype(), device=device)

        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)
        positions = torch.full((batch, longest), -1, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            positions[row, longest - len(ids):] = torch.arange(len(ids))
        input_ids, positions = input_ids.to(device), positions.to(device)

        seqs = []
        for ids, p in zip(prompts, params):
            gen = None
            if not p.greedy:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(p.seed if p.seed is not None else int(torch.seed() % (2**63)))
            seqs.append(_Seq(p, len(ids), gen, torch.tensor(ids, dtype=torch.long)))

        t0 = time.perf_counter()
        with torch.inference_mode():
            embeds, groups = None, torch.full_like(input_ids, -1)
            if hasattr(self.model, "prepare_embeds"):
                extra = extra or {}
                with image_progress(extra.get("pixel_values")) as on_image:
                    embeds, groups = self.model.prepare_embeds(input_ids, **extra, on_image=on_image)
            logits = None
            for start, end in _chunks(groups, longest, PREFILL_CHUNK):
                kwargs = dict(positions=positions[:, start:end], groups=groups[:, start:end], cache=cache,
                              last_only=True)
                if embeds is not None:
                    logits = self.model(inputs_embeds=embeds[:, start:end], **kwargs)
                else:
                    logits = self.model(input_ids[:, start:end], **kwargs)
            prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            next_pos = positions[:, -1:] + 1
            for step in range(budget):
                tokens = []
                for row, seq in enumerate(seqs):
                    if seq.done:
                        tokens.append(self.pad_id)
                        continue
                    tok = seq.choose(logits[row, -1])
                    tokens.append(tok)
                    event = self._advance(row, seq, tok, logits[row, -1])
                    if event is not None:
                        if event.done:
                            event.completion = self._completion(seq, prefill_s, time.perf_counter() - t1)
                        yield event
                if all(s.done for s in seqs) or step == budget - 1:
                    break
                step_pos = torch.where(torch.tensor([s.done for s in seqs], device=device)[:, None],
                                       torch.full_like(next_pos, -1), next_pos)
                logits = self.model(torch.tensor(tokens, device=device)[:, None], positions=step_pos,
                                    groups=torch.full_like(step_pos, -1), cache=cache, last_only=True)
                next_pos = next_pos + 1
            decode_s = time.perf_counter() - t1
        for row, seq in enumerate(seqs):
            if not seq.done:
                seq.done, seq.finish_reason = True, "length"
                final = seq.text[seq.emitted:]
                yield StreamEvent(row, final, True, self._completion(seq, prefill_s, decode_s))

    def _advance(self, row: int, seq: _Seq, tok: int, logits: torch.Tensor | None = None) -> StreamEvent | None:
        """Record a sampled token (`logits`: the raw ones it came from, for logprobs); return the text to
        stream (and whether the sequence ended)."""
        if tok in self.stop_ids and not seq.params.ignore_eos:
            seq.done, seq.finish_reason = True, "stop"
            seq.text = self.decode(seq.ids)
            return StreamEvent(row, seq.text[seq.emitted:], True)
        seq.ids.append(tok)
        seq.seen = torch.cat((seq.seen, torch.tensor([tok])))
        if seq.logprobs is not None and logits is not None:
            seq.logprobs.append(token_logprob(logits, tok, seq.params.logprobs))
        ended = False
        if seq.matcher is not None:
            if not seq.matcher.accept(tok):  # a bug: the mask let it through
                log.error("the grammar refused an emitted token (%s); ending the request", seq.matcher.error)
            ended = seq.matcher.stopped or bool(seq.matcher.error)
        text = self.decode(seq.ids)
        cut = _stop_cut(text, seq.params.stop)
        if ended and cut is None:  # the grammar is complete: nothing but a stop token may follow
            seq.done, seq.finish_reason, seq.text = True, "stop", text
            return StreamEvent(row, text[seq.emitted:], True)
        if cut is not None:
            seq.done, seq.finish_reason, seq.text = True, "stop", text[:cut]
            return StreamEvent(row, seq.text[seq.emitted:], True)
        if len(seq.ids) >= seq.params.max_new_tokens:
            seq.done, seq.finish_reason, seq.text = True, "length", text
            return StreamEvent(row, text[seq.emitted:], True)
        seq.text = text
        safe = _safe_prefix(text, seq.params.stop)
        if safe > seq.emitted:
            delta, seq.emitted = text[seq.emitted:safe], safe
            return StreamEvent(row, delta)
        return None

    @staticmethod
    def _completion(seq: _Seq, prefill_s: float, decode_s: float) -> Completion:
        return Completion(seq.text, list(seq.ids), seq.prompt_len, seq.finish_reason, prefill_s, decode_s,
                          seq.logprobs)

    def run(self, prompts: list[list[int]], params: list[SamplingParams], extra: dict | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        for event in self.stream(prompts, params, extra):
            if event.done:
                results[event.index] = event.completion
        return results  # type: ignore[return-value]
