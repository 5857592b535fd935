"""Speculative decoding: a drafter proposes up to k tokens, and the target checks them in one forward.

Decoding reads every target weight once per token. When something cheap guesses the next k tokens,
one target forward over k + 1 tokens checks them all, and each accepted guess saves a whole target
step. Two drafters:
- `Drafter`: a small draft model of the same tokenizer (the embedded 270M for a bigger MedGemma).
- `PromptLookup`: no model; it copies what followed the latest earlier occurrence of the sequence's
  last few tokens (prompt lookup decoding, as in vLLM's n-gram speculator and llama.cpp's lookup).
  Summaries, reports and extractions repeat their source's wording, so it guesses well there, and it
  speeds up the model itself, with no second model in memory.
The scheduler (engine/scheduler.py) calls the drafter for its decoding rows, verifies with the target,
and calls `accept` per row.

The target's distribution is preserved exactly:
- greedy: at each position the target's own choice (`sample_next` on its logits) decides. Drafts are
  kept while they equal it, and the first mismatch is replaced by the target's choice. The text is the
  target's greedy text; only floating-point rounding differs, as the target scores k + 1 tokens in one
  matmul instead of one at a time.
- sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023). Draft token x, drawn from q,
  is kept with probability min(1, p(x) / q(x)). At the first rejection a token is drawn from
  norm(max(0, p - q)). When all k are kept, a bonus token is drawn from p. Every emitted token is then
  distributed as p, the target's filtered distribution (temperature, top-k/p, min-p, repetition
  penalty as in engine/sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medgem.config import TextConfig
from medgem.engine.prefix_cache import PrefixCache
from medgem.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_next
from medgem.engine.slots import SlotModel
from medgem.errors import ConfigError


def distribution(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """The probabilities `sample_next` draws from (sampling mode): fp32 [V]."""
    logits = apply_repetition_penalty(logits.float(), seen, p.repetition_penalty)
    return torch.softmax(filter_logits(logits, p), dim=-1)


def _draw(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor,
          generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """A draft token and, when sampling, the distribution q it came from."""
    if p.greedy:
        return sample_next(logits, p, seen, None), None
    q = distribution(logits, p, seen)
    return int(torch.multinomial(q, 1, generator=generator)), q


def accept(target_logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor],
           p: SamplingParams, seen: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """Tokens to emit for one sequence: the accepted drafts, then one token of the target's own.

    target_logits: [k + 1, V] for the positions after the last token and after each draft.
    draft_probs: the k distributions the drafts were drawn from (unused when greedy).
    seen: the sequence so far (for the repetition penalty).
    """
    out: list[int] = []
    for j, d in enumerate(drafts):
        seen_j = torch.cat((seen, torch.tensor(out, dtype=torch.long)))
        if p.greedy:
            choice = sample_next(target_logits[j], p, seen_j, None)
            if choice != d:
                return out + [choice]
            out.append(d)
            continue
        probs = distribution(target_logits[j], p, seen_j)
        q = torch.zeros_like(probs)
        q[: draft_probs[j].shape[-1]] = draft_probs[j]  # a draft vocabulary may be a prefix of the target's
        if torch.rand((), generator=generator) * q[d] < probs[d]:
            out.append(d)
            continue
        residual = (probs - q).clamp(min=0)
        residual = residual if residual.sum() > 0 else probs  # p == q up to rounding: nothing to correct
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    bonus_seen = torch.cat((seen, torch.tensor(out, dtype=torch.long)))
    return out + [sample_next(target_logits[len(drafts)], p, bonus_seen, generator)]


class Drafter:
    """A small model of the target's tokenizer that proposes `k` tokens per step for every decoding row.

    It keeps its own slot cache, fed with the same committed tokens as the target's: the prompt
    during prefill, then the accepted tokens. Token ids the draft cannot embed (image soft tokens, ids
    past its vocabulary) are fed as padding; that only makes its guesses worse, never the output.
    """

    def __init__(self, model: torch.nn.Module, k: int = 4):
        if k < 1:
            raise ConfigError(f"the draft must propose at least 1 token per step, not {k}")
        self.model, self.k = model, k
        config = getattr(model, "text_config", None) or model.config
        if not isinstance(config, TextConfig):
            raise ConfigError("the draft model must be a Gemma 3 decoder (nn/text.py)")
        self.config = config
        self.lane: SlotModel | None = None
        self.prefix: PrefixCache | None = None
        self.proposed = self.accepted = 0  # for the acceptance rate in metrics

    def bind(self, slots: int, capacity: int, slack: int, prefix: PrefixCache | None) -> None:
        """Allocate the draft's cache for the scheduler's slots (called by the scheduler)."""
        self.lane = SlotModel(self.model, self.config, slots, capacity, slack)
        self.prefix = prefix

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long)
        return t.masked_fill(t >= self.config.vocab_size, self.config.pad_token_id)

    def length(self, slot: int) -> int:
        return self.lane.cache.lengths[slot]

    def prefill(self, slot: int, prompt: list[int], end: int) -> None:
        """Feed prompt tokens up to `end` that the draft has not seen yet, in chunks its cache accepts."""
        step = self.lane.cache.slack
        for start in range(self.length(slot), end, step):
            stop = min(start + step, end)
            self.lane.hidden(slice(slot, slot + 1), torch.arange(start, stop)[None],
                             ids=self._ids(prompt[start:stop])[None], last_only=True)

    def propose(self, rows: list[tuple[int, list[int], SamplingParams, torch.Tensor, torch.Generator | None]]
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """k draft tokens per row, and the distributions they came from (empty for greedy rows).

        rows: (slot, committed tokens (prompt + generated), params, seen, generator) per decoding row.
        The first forward catches the draft up on the tokens committed since its last step (1 or 2).
        """
        slots = [r[0] for r in rows]
        hi = max(slots) + 1
        catch = [tokens[self.length(slot):] for slot, tokens, *_ in rows]
        width = max(map(len, catch))
        ids = torch.full((hi, width), self.config.pad_token_id, dtype=torch.long)
        positions = torch.full((hi, width), -1, dtype=torch.long)
        for slot, new in zip(slots, catch):
            ids[slot, width - len(new):] = self._ids(new)  # left-padded: the last column is real everywhere
            positions[slot, width - len(new):] = torch.arange(self.length(slot), self.length(slot) + len(new))
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for step in range(self.k):
            hidden = self.lane.hidden(slice(0, hi), positions, ids=ids, last_only=True)
            logits = self.lane.logits(hidden[slots, -1])
            for i, (_, _, params, seen, generator) in enumerate(rows):
                seen_i = torch.cat((seen, torch.tensor(drafts[i], dtype=torch.long)))
                token, q = _draw(logits[i], params, seen_i, generator)
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
            if step == self.k - 1:
                break
            ids = torch.full((hi, 1), self.config.pad_token_id, dtype=torch.long)
            positions = torch.full((hi, 1), -1, dtype=torch.long)
            for i, slot in enumerate(slots):
                ids[slot, 0] = self._ids([drafts[i][-1]])[0]
                positions[slot, 0] = self.length(slot)
        self.proposed += self.k * len(rows)
        return drafts, probs

    def rollback(self, slot: int, committed: int, accepted: int) -> None:
        """Keep the draft's cache within the `committed` tokens the target kept."""
        self.accepted += accepted
        self.lane.cache.truncate(slot, min(self.length(slot), committed))

    def free(self, slot: int) -> None:
        self.lane.cache.free(slot)


@dataclass
class _Lookup:
    """One slot's prompt-lookup state."""

    indexed: int = 0  # tokens of the sequence whose n-grams are in `index`
    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> where it last continued
    budget: int = 0  # most tokens to draft next step
    drafted: int = 0  # tokens drafted this step


class PromptLookup:
    """Drafts by copying from the sequence itself (prompt + generated so far).

    The sequence's last n tokens (n = max_ngram down to 1) are looked up among its earlier tokens; the
    tokens that followed their latest earlier occurrence are the draft. A row with no match drafts
    nothing and decodes one token. Each slot keeps an index from every n-gram to where it last
    continued, extended by the tokens committed since the last step, so a step costs O(new tokens).

    A verification of w tokens costs more than one of 1 (about 1.6x at w = 9 on the int8 270M, eager),
    and copies are often wrong until the text settles into quoting. So a slot drafts at most
    2 * (drafts accepted last step) + 1 tokens, up to k, like TCP's slow start: after a miss it risks one
    token, after a run of hits all k (benchmarks/lookup.py compares it with `slow_start=False`, always
    k, as llama.cpp and vLLM draft). Drafts are certain (q is one-hot): `accept` keeps one with the
    target's probability of it.
    """

    config = None  # no model: no window, no cache to bind
    prefix = None

    def __init__(self, k: int = 8, max_ngram: int = 3, slow_start: bool = True):
        if k < 1 or max_ngram < 1:
            raise ConfigError(f"prompt lookup needs k >= 1 and max_ngram >= 1, not k={k}, max_ngram={max_ngram}")
        self.k, self.max_ngram, self.slow_start = k, max_ngram, slow_start
        self._slots: dict[int, _Lookup] = {}
        self.proposed = self.accepted = 0

    def bind(self, slots: int, capacity: int, slack: int, prefix: PrefixCache | None) -> None:
        self._slots.clear()

    def prefill(self, slot: int, prompt: list[int], end: int) -> None:
        """Nothing to run: the prompt is indexed at the first proposal."""

    def _lookup(self, slot: int, tokens: list[int]) -> list[int]:
        state = self._slots.setdefault(slot, _Lookup(budget=self.k))
        # Index the n-grams ending before the last token: the last one's continuation is what we guess.
        for end in range(max(state.indexed, 1), len(tokens)):
            for n in range(1, min(self.max_ngram, end) + 1):
                state.index[tuple(tokens[end - n:end])] = end
        state.indexed = max(state.indexed, len(tokens))
        draft: list[int] = []
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = state.index.get(tuple(tokens[-n:]))
            if start is not None:
                draft = tokens[start:start + state.budget]
                break
        state.drafted = len(draft)
        return draft

    def propose(self, rows: list[tuple[int, list[int], SamplingParams, torch.Tensor, torch.Generator | None]]
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Up to k draft tokens per row and their one-hot distributions (empty for greedy rows)."""
        drafts = [self._lookup(slot, tokens) for slot, tokens, *_ in rows]
        probs = [[] if params.greedy else [_one_hot(t) for t in d] for d, (_, _, params, _, _) in zip(drafts, rows)]
        self.proposed += sum(map(len, drafts))
        return drafts, probs

    def rollback(self, slot: int, committed: int, accepted: int) -> None:
        self.accepted += accepted
        state = self._slots.get(slot)
        if self.slow_start and state is not None and state.drafted:
            state.budget = min(self.k, 2 * accepted + 1)

    def free(self, slot: int) -> None:
        self._slots.pop(slot, None)


def _one_hot(token: int) -> torch.Tensor:
    """A certain draft's distribution, as a prefix of the vocabulary (`accept` pads it)."""
    q = torch.zeros(token + 1)
    q[token] = 1.0
    return q
