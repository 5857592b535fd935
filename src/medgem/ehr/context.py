"""The context for one question about one record, under a token budget.

Layout, top to bottom: the fixed current-state sections (always present), timeline excerpts chosen
for the question and shown in date order, and one line saying what was left out. When the model
has a sliding attention window, the best-ranked excerpts are moved after that line, so they sit
inside the window of the local-attention layers right before the question (Gemma 3 attends locally
in five of every six layers; only its global layers see the far past).

Excerpts are ranked by BM25 over the question's words, optionally fused (reciprocal rank) with
MiniLM embedding similarity. Ties go to the most recent entry, or to the oldest when the question
asks for the first or earliest one. Tokens are counted by the caller's `count_tokens`, normally the
model's own tokenizer, so the budget is exact.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from medgem.ehr.timeline import Timeline, event_line
from medgem.errors import ContextLengthError

CountTokens = Callable[[str], int]

_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
# Words that every chunk or question shares: they only add noise to BM25.
_STOP = frozenset({
    "a", "an", "the", "of", "to", "in", "on", "at", "for", "and", "or", "is", "was", "were", "be", "been", "are",
    "what", "which", "when", "who", "how", "many", "much", "does", "do", "did", "has", "have", "had", "patient",
    "patients", "result", "results", "value", "most", "recent", "latest", "current", "last", "first", "ever", "any",
})  # fmt: skip
_OLDEST_FIRST = re.compile(r"\b(first|earliest|initial|original|oldest)\b", re.I)
_NOTE_WORDS = 90  # notes are split into pieces of about this many words, so one note cannot crowd out the rest


def words(text: str) -> list[str]:
    """BM25 terms: lowercase words and decimals, without the stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass(frozen=True)
class Chunk:
    """A piece of the timeline that is either shown whole or left out."""

    text: str
    ref: str
    when: str
    kind: str


@dataclass(frozen=True)
class Context:
    """A rendered context and what it holds, for prompts, evaluation and reports."""

    text: str
    tokens: int
    refs: frozenset[str]  # resources whose facts are in the text
    sections: tuple[str, ...]  # fixed sections present
    shown: int  # timeline excerpts shown
    omitted: int  # timeline entries left out


def timeline_chunks(timeline: Timeline, exclude: frozenset[str] = frozenset()) -> list[Chunk]:
    """One chunk per event line (notes split into pieces), leaving out events already in `exclude`."""
    chunks = []
    for e in timeline.events:
        if e.ref in exclude:
            continue
        line = event_line(e)
        if e.kind != "note" or len(line.split()) <= _NOTE_WORDS:
            chunks.append(Chunk(line, e.ref, e.when, e.kind))
            continue
        head, _, body = line.partition("\n")
        tokens = body.split()
        for i in range(0, len(tokens), _NOTE_WORDS):
            part = f"{head} (part {i // _NOTE_WORDS + 1})\n" + " ".join(tokens[i : i + _NOTE_WORDS])
            chunks.append(Chunk(part, e.ref, e.when, e.kind))
    return chunks


class Retriever:
    """Ranks chunks for a question: BM25, or BM25 fused with MiniLM similarity."""

    def __init__(self, chunks: list[Chunk], embedder=None):
        from rank_bm25 import BM25Okapi

        self.chunks = chunks
        self.bm25 = BM25Okapi([words(c.text) or ["_"] for c in chunks]) if chunks else None
        self.embedder = embedder
        self._vectors = None

    def rank(self, question: str) -> list[int]:
        """Chunk indices, best first."""
        if not self.chunks:
            return []
        oldest_first = bool(_OLDEST_FIRST.search(question))
        by_date = sorted(range(len(self.chunks)), key=lambda i: self.chunks[i].when, reverse=not oldest_first)
        recency = {i: r for r, i in enumerate(by_date)}
        scores = self.bm25.get_scores(words(question) or ["_"])
        ranking = sorted(by_date, key=lambda i: -scores[i])
        if self.embedder is None:
            return ranking
        if self._vectors is None:
            self._vectors = self.embedder.encode([c.text for c in self.chunks])
        similarity = (self._vectors @ self.embedder.encode([question])[0]).tolist()
        semantic = sorted(by_date, key=lambda i: -similarity[i])
        fused = Counter()
        for order in (ranking, semantic):
            for r, i in enumerate(order):
                fused[i] += 1.0 / (60 + r)  # reciprocal rank fusion, k=60 as in Cormack et al.
        return sorted(by_date, key=lambda i: (-fused[i], recency[i]))


class ContextBuilder:
    """Builds question contexts for one timeline; reuse it across questions (it caches counts and vectors)."""

    def __init__(self, timeline: Timeline, count_tokens: CountTokens, embedder=None):
        self.timeline = timeline
        self.count = count_tokens
        self.fixed = timeline.fixed_sections()
        self.fixed_text = "\n\n".join(s.text for s in self.fixed)
        self.fixed_refs = frozenset().union(*(s.refs for s in self.fixed))
        self.chunks = timeline_chunks(timeline, exclude=self.fixed_refs)
        self.retriever = Retriever(self.chunks, embedder)
        self._sizes: dict[int, int] = {}

    def _size(self, i: int) -> int:
        if i not in self._sizes:
            self._sizes[i] = self.count(self.chunks[i].text + "\n")
        return self._sizes[i]

    def build(self, question: str, budget: int, window: int | None = None) -> Context:
        """The fixed sections plus the best excerpts for `question` that fit in `budget` tokens."""
        fixed_tokens = self.count(self.fixed_text)
        reserve = 64  # the excerpt header and the "not shown" line
        if fixed_tokens + reserve > budget:
            raise ContextLengthError(
                f"the record's current-state sections need {fixed_tokens + reserve} tokens but the budget is "
                f"{budget}; raise --budget"
            )
        chosen, used = [], fixed_tokens + reserve
        for i in self.retriever.rank(question):
            if used + self._size(i) <= budget:
                chosen.append(i)
                used += self._size(i)
        while True:
            text = self._render(chosen, window)
            tokens = self.count(text)
            if tokens <= budget or not chosen:
                break
            chosen.pop()  # per-line counts are additive only approximately; drop the weakest and recount
        shown = {self.chunks[i].ref for i in chosen}
        omitted = len({c.ref for c in self.chunks} - shown)
        return Context(text, tokens, self.fixed_refs | shown, tuple(s.name for s in self.fixed), len(shown), omitted)

    def _render(self, chosen: list[int], window: int | None) -> str:
        near: list[int] = []
        if window:  # the best-ranked excerpts that fit in half the window go last, next to the question
            room = window // 2
            for i in chosen:
                if self._size(i) > room:
                    break
                near.append(i)
                room -= self._size(i)
        far = sorted(set(chosen) - set(near), key=lambda i: (self.chunks[i].when, i))
        near.sort(key=lambda i: (self.chunks[i].when, i))
        shown = {self.chunks[i].ref for i in chosen}
        entries = {c.ref: c for c in self.chunks}  # a note split in pieces is one entry
        if len(shown) == len(entries):
            header = f"TIMELINE (all {len(entries)} other entries, in date order):"
        else:
            header = (
                f"TIMELINE EXCERPTS ({len(shown)} of {len(entries)} other entries, chosen for the question, "
                "in date order):"
            )
        lines = [self.fixed_text, "", header, *(self.chunks[i].text for i in far)]
        left = [c for ref, c in entries.items() if ref not in shown]
        if left:
            kinds = Counter(c.kind for c in left)
            dates = sorted(c.when for c in left if c.when)
            span = f", dated {dates[0]} to {dates[-1]}" if dates else ""
            by_kind = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
            lines.append(f"NOT SHOWN: {len(left)} entries ({by_kind}){span}.")
        if near:
            lines += ["MOST RELEVANT ENTRIES (date order):", *(self.chunks[i].text for i in near)]
        return "\n".join(lines)
