"""Constrained decoding: a per-request token mask built by llguidance from a JSON schema, a regex, a
list of choices or a grammar.

The library compares below were measured on this machine (benchmarks/structured.py): llguidance builds
its tokenizer view of Gemma's 262,144 pieces once, compiles a schema lazily (the lexer grows while
decoding) and computes a mask in tens of microseconds. It installs as one wheel with no dependencies;
xgrammar needs transformers, triton and apache-tvm-ffi at import.

Layers: a `Constraint` says what the output must match (hashable: the cache key). `Grammars` compiles
constraints for one tokenizer, caches them, and refuses bad ones with an InputError that names the
problem. A `Grammar` is what SamplingParams carries; the engine asks it for one `Matcher` per request
(engine/generate.py `_Seq`), which masks logits before sampling and advances on every emitted token.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from medgem.errors import InputError

if TYPE_CHECKING:
    from medgem.processing.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
# Compact, fixed separators: no free whitespace, so a small model cannot pad JSON with blank lines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec` is canonical text, so equal schemas share one cache entry."""

    kind: Kind
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InputError(f"the JSON schema is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(schema, dict):
            raise InputError("a JSON schema must be a JSON object")
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise InputError("the regex is empty")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if not isinstance(options, list | tuple) or not options or not all(isinstance(o, str) and o for o in options):
            raise InputError("choice needs a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        if not isinstance(text, str) or not text.strip():
            raise InputError("the grammar is empty")
        return cls("grammar", text)

    @classmethod
    def from_options(cls, json_schema: dict[str, Any] | str | None = None, regex: str | None = None,
                     choice: list[str] | None = None, grammar: str | None = None) -> Constraint | None:
        """The one constraint among the Python API's keyword arguments (None when none is given)."""
        given = {k: v for k, v in dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar).items()
                 if v is not None}
        if len(given) > 1:
            raise InputError(f"give one output constraint, not {' and '.join(given)}")
        if not given:
            return None
        (kind, value), = given.items()
        return getattr(cls, kind)(value)

    def llguidance(self) -> str:
        """The llguidance grammar text (raises ValueError on malformed choices or grammars)."""
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_OPTIONS)
        fmt = {"regex": "regex", "choice": "choice", "grammar": "grammar"}[self.kind]
        return llguidance.grammar_from(fmt, self.spec)


    def check(self) -> None:
        """Raise InputError if the constraint is malformed (no tokenizer needed: the CLI checks its flags
        before loading a model)."""
        import llguidance

        what = self.kind.replace("_", " ")
        try:
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.llguidance())
        except ValueError as exc:
            failed, messages = True, [str(exc)]
        if failed:
            raise InputError(f"the {what} is invalid: {_first_line(messages[0] if messages else '')}")


class Grammar:
    """A compiled constraint for one tokenizer: makes the per-request matchers."""

    def __init__(self, constraint: Constraint, template: Any, vocab_size: int):
        self.constraint, self._template, self.vocab_size = constraint, template, vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.vocab_size)


class Matcher:
    """One request's grammar state: the mask of tokens allowed next, advanced token by token."""

    def __init__(self, ll: Any, vocab_size: int):
        self._ll, self.vocab_size = ll, vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens the grammar accepts next (stop tokens once it may end)."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        self._ll.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(np.bool_)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits [V] with every token the grammar refuses at -inf (V may exceed the tokenizer's pieces).

        In numpy, on one thread: torch's 262k-element fill and select each took 15 ms on a busy 2-core
        host (OpenMP teams waiting for cores), numpy's 0.3 ms.
        """
        allowed, source = self._allowed(), logits.detach().float().cpu().numpy()
        out = np.full(source.shape, -np.inf, dtype=np.float32)
        width = min(source.shape[-1], self.vocab_size)
        np.copyto(out[:width], source[:width], where=allowed[:width])
        return torch.from_numpy(out)

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (without computing the whole mask)."""
        return self._ll.validate_tokens([token]) == 1

    def accept(self, token: int) -> bool:
        """Advance past an emitted token; False when the grammar refuses it (never after `mask`)."""
        return bool(self._ll.consume_token(token))

    def rollback(self, n: int) -> None:
        if n:
            self._ll.rollback(n)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and accepts nothing more but a stop token."""
        return bool(self._ll.is_stopped())

    @property
    def error(self) -> str:
        return self._ll.get_error() if self._ll.is_error() else ""


class Grammars:
    """Compiles constraints against one tokenizer and keeps the last CACHE_SIZE of them.

    The llguidance tokenizer (the bytes of all 262k pieces) is built once, at the first constraint.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        self._tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, tuple(stop_ids)
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles in worker threads
        self.hits = self.misses = 0

    def _lltok(self) -> Any:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = ll_tokenizer(self._tokenizer, self.vocab_size, self.stop_ids)
        return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar (cached by constraint); InputError names what is wrong with it."""
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                self.hits += 1
                return hit
            self.misses += 1
            grammar = Grammar(constraint, self._build(constraint), self.vocab_size)
            self._cache[constraint] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _build(self, constraint: Constraint) -> Any:
        import llguidance

        what = constraint.kind.replace("_", " ")
        try:
            text = constraint.llguidance()
        except ValueError as exc:
            raise InputError(f"the {what} is invalid: {_first_line(exc)}") from None
        matcher = llguidance.LLMatcher(self._lltok(), text, log_level=0)
        if matcher.is_error():
            raise InputError(f"the {what} is invalid: {_first_line(matcher.get_error())}")
        text_tokens = Matcher(matcher.deep_copy(), self.vocab_size).allowed().clone()
        text_tokens[list(self.stop_ids)] = False
        if not text_tokens.any() and not matcher.is_accepting():  # only a stop token, yet nothing matched
            raise InputError(f"the {what} can never be satisfied (it matches no text)")
        return matcher


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    """llguidance's view of the vocabulary: each piece's bytes, special pieces marked with 0xFF (never
    matched by text), padded with empty tokens up to the model's logits width."""
    import llguidance

    class _Wrapper:
        def __init__(self) -> None:
            pieces = tokenizer.token_bytes()
            self.tokens = [b"\xff" + b if special else b for b, special in pieces]
            self.tokens += [b""] * (vocab_size - len(self.tokens))
            self.special_token_ids = [i for i, (_, special) in enumerate(pieces) if special]
            self.eos_token_id, self.bos_token_id = stop_ids[0], tokenizer.bos_id

        def __call__(self, text: str | bytes) -> list[int]:
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return tokenizer.encode(text, add_bos=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper()), n_vocab=vocab_size,
                                  eos_token=list(stop_ids))


def _first_line(message: object) -> str:
    """The library's message on one line (its regex errors draw the position over several)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return text[:300] or "unknown error"
