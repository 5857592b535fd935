"""OpenAI's structured-output, tool and logprob fields -> engine inputs, and engine logprobs -> OpenAI's shapes.

The server only translates: `response_format` (json_object, json_schema), vLLM's `structured_outputs`
(json, regex, choice, grammar, json_object) and tools become one engine `Constraint` (compiled and
cached by the pipeline, engine/constraints.py); the engine's `TokenLogprob`s become the `logprobs`
object of a chat choice (`content` entries with bytes) or of a completion choice (parallel lists).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from medgem.engine.constraints import Constraint, Grammar
from medgem.engine.logits import TokenLogprob
from medgem.errors import InputError
from medgem.pipeline import Pipeline
from medgem.processing import tools as toolfmt
from medgem.serve.errors import APIError
from medgem.serve.schemas import ChatRequest, SamplingFields


def requested_constraint(body: SamplingFields) -> tuple[Constraint | None, str | None]:
    """The output constraint a request asks for through response_format or structured_outputs, and the
    field that asked (for error messages); 400 when both ask, or the field is malformed."""
    found: list[tuple[Constraint, str]] = []
    fmt, so = body.response_format, body.structured_outputs
    try:
        if fmt is not None and fmt.type == "json_object":
            found.append((Constraint.json_object(), "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InputError("a response_format of type json_schema needs json_schema.schema")
            found.append((Constraint.json_schema(fmt.json_schema.schema_), "response_format"))
    except InputError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format", code="invalid_value") from None
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar), ("json_object", so.json_object or None)) if v is not None}
        try:
            if len(given) != 1:
                raise InputError("give exactly one of json, regex, choice, grammar and json_object")
            (kind, value), = given.items()
            make = {"json": Constraint.json_schema, "regex": Constraint.regex, "choice": Constraint.choice,
                    "grammar": Constraint.grammar, "json_object": lambda _: Constraint.json_object()}[kind]
            found.append((make(value), "structured_outputs"))
        except InputError as exc:
            raise APIError(400, f"structured_outputs: {exc}", param="structured_outputs",
                           code="invalid_value") from None
    if len(found) > 1:
        raise APIError(400, "send either response_format or structured_outputs, not both", param="response_format",
                       code="invalid_value")
    return found[0] if found else (None, None)


def compile_constraint(pipe: Pipeline, constraint: Constraint, field: str) -> Grammar:
    """The compiled grammar (blocking: run it in a worker thread); 400 naming the problem."""
    try:
        return pipe.grammars.compile(constraint)
    except InputError as exc:
        code = "invalid_schema" if constraint.kind == "json_schema" else "invalid_value"
        raise APIError(400, f"{field}: {exc}", param=field, code=code) from None


def tool_setup(body: ChatRequest) -> tuple[list[toolfmt.ToolSpec], str]:
    """The tools and the effective tool_choice ("none", "auto", "required" or a function name)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return [], "none"
    try:
        specs = toolfmt.tool_specs([t.model_dump(by_alias=True) for t in body.tools])
    except InputError as exc:
        raise APIError(400, str(exc), param="tools", code="invalid_value") from None
    name = choice if isinstance(choice, str) or choice is None else choice.function.name
    name = name or "auto"
    if name not in ("none", "auto", "required") and name not in {s.name for s in specs}:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                       param="tool_choice", code="unknown_tool")
    return specs, name


def tool_constraint(specs: list[toolfmt.ToolSpec], choice: str, parallel: bool | None) -> Constraint | None:
    if not specs or choice == "none":
        return None
    return Constraint.grammar(toolfmt.call_grammar(specs, choice, parallel is not False))


def logit_bias(body: SamplingFields, vocab: int) -> dict[int, float]:
    """`logit_bias` with its keys as token ids; 400 for a key that is not one."""
    out = {}
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise APIError(400, f"logit_bias: {key[:20]!r} is not a token id of this model (0..{vocab - 1})",
                           param="logit_bias", code="invalid_value")
        out[int(key)] = bias
    return out


@cache
def _pieces(pipe: Pipeline) -> list[bytes]:
    return [b for b, _ in pipe.tokenizer.token_bytes()]


def _token(pipe: Pipeline, token: int) -> tuple[str, bytes]:
    pieces = _pieces(pipe)
    raw = pieces[token] if token < len(pieces) else b""
    return raw.decode("utf-8", "replace"), raw


def chat_logprobs(pipe: Pipeline, entries: list[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = _token(pipe, token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(pipe: Pipeline, entries: list[TokenLogprob], offset: int = 0,
                        lead: int | None = None) -> dict[str, Any]:
    """A completion choice's `logprobs`: tokens, token_logprobs, top_logprobs and text_offset lists.
    lead: an echoed prompt's first token, which has no logprob (null, as OpenAI sends it)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token: int, logprob: float | None, top: dict[str, float] | None) -> None:
        nonlocal offset
        text = _token(pipe, token)[0]
        for key, value in zip(out, (text, logprob, top, offset)):
            out[key].append(value)
        offset += len(text)

    if lead is not None:
        add(lead, None, None)
    for e in entries:
        add(e.token, e.logprob, {_token(pipe, t)[0]: lp for t, lp in e.top})
    return out
