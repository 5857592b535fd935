"""Per-request logit adjustments before sampling, and the logprobs reported after it.

OpenAI's order, as vLLM applies it: frequency and presence penalties (over the generated tokens
only), then `logit_bias`, then the grammar mask (engine/constraints.py), so a bias can never let a
refused token through. Sampling (engine/sampling.py) then applies the repetition penalty, temperature
and the top-k/p filters. Logprobs are those of the model itself: the log-softmax of the raw logits,
before any of this (vLLM's default `raw_logprobs`), so they equal what `pipe.model` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from medgem.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from medgem.engine.constraints import Matcher


@dataclass
class TokenLogprob:
    """One emitted token's log-probability and the `top` most likely tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def needs_adjusting(p: SamplingParams, matcher: Matcher | None) -> bool:
    return bool(matcher is not None or p.logit_bias or p.frequency_penalty or p.presence_penalty)


def adjust(logits: torch.Tensor, p: SamplingParams, generated: list[int], matcher: Matcher | None) -> torch.Tensor:
    """fp32 logits [V] after penalties, bias and the grammar mask (a new tensor; the input is kept)."""
    logits = logits.float()
    if (p.frequency_penalty or p.presence_penalty) and generated:
        ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
        logits = logits.index_add(0, ids, -(p.frequency_penalty * counts.float() + p.presence_penalty))
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits = logits.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype))
    if matcher is not None:
        logits = matcher.mask(logits)
    return logits


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The raw model's log-probability of `token` and its `top` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)
