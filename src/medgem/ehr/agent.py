"""A records agent: the model answers a question about one patient by calling tools over the local FHIR
data, instead of reading one retrieved context (`ehr ask`).

This follows the pattern of Google's EHR navigator agent for MedGemma (two FHIR tools, prompted rather
than templated, since Gemma 3 has no tool-call tokens): a manifest of what the record holds, and a fetch
of one resource type at a time, filtered by code or date. The prompt and call format are medgem's tool
format (processing/tools.py), and every call is constrained by that module's call grammar, so a call
always parses and its arguments follow the tool's schema (`resource_type` is an enum of the types this
record has, `code` one of the codes and names it holds, dates match YYYY-MM-DD).

The loop, per question: step 1 must call a tool (tool_choice "required"), later steps may call one or
answer ("auto"), and the last step must answer ("none"), so `max_steps` bounds the work. The manifest never
changes, so once called it leaves the grammar (a small model otherwise asks for it again and again).
Questions run in lockstep: each step is one batched generation over every question still open (grouped by
grammar).

A base (pretrained-only) model, such as the embedded Gemma 3 270M, writes repetitive text in chat turns
(pipeline.is_base_model), so for one the middle steps must call a tool too and the answer is asked as
`ehr ask` asks it: the completion prompt of ehr/qa.py, with the tool results as the record. The calls stay
chat turns with constrained JSON, the same as for a tuned model.
With `deid`, the record is de-identified (ehr/deid.py) before any tool reads it, so nothing the model sees,
and nothing in the transcript, carries an identifier or a true date.

A tool result is the timeline's compact lines (ehr/timeline.py `event_line`), at most `result_tokens`
tokens of them (the most recent first kept), so the prompt stays near `ehr ask`'s budget.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgem.ehr.context import CountTokens
from medgem.ehr.deid import deidentify
from medgem.ehr.qa import ANSWER_TYPES, FORMATS, MAX_NEW_TOKENS, STOP, build_prompt
from medgem.ehr.timeline import Timeline, event_line
from medgem.errors import InputError
from medgem.inputs.fhir import Event, Record, load_record
from medgem.processing import tools as toolfmt

MAX_STEPS = 4
RESULT_TOKENS = 512  # per tool result; 3 results + instructions is about `ehr ask`'s 2,000-token budget
CALL_TOKENS = 160  # a call is at most ~100 tokens (enum type, a code or name of <= 60 characters, two dates)
CODES_SHOWN = 15  # distinct codes listed per resource type in the manifest
_DATE = r"^\d{4}-\d{2}-\d{2}$"
INSTRUCTIONS = ("You answer questions about one patient's health record. The record is not in this "
                "conversation: call get_manifest to see what it holds, and fetch_resources to read one "
                "resource type, filtered by a code or name from the manifest and by dates. Then answer in "
                "plain text, on one line.")
FINAL_NUDGE = "No more calls: answer the question now, in plain text."


class RecordTools:
    """The two tools over one (optionally de-identified) record."""

    def __init__(self, record: Record, count_tokens: CountTokens, result_tokens: int = RESULT_TOKENS):
        self.timeline = Timeline(record)
        self.count, self.result_tokens = count_tokens, result_tokens
        self.by_type: dict[str, list[Event]] = {}
        for e in self.timeline.events:
            self.by_type.setdefault(e.ref.split("/", 1)[0], []).append(e)
        types = sorted(self.by_type) or ["Observation"]  # an empty record still gets a valid schema
        # The codes and names this record holds: a small model then picks a real one instead of making one up.
        codes = sorted({x for e in self.timeline.events for x in (_code(e), e.name) if x and len(x) <= 60})
        self.specs = toolfmt.tool_specs([
            {"name": "get_manifest", "description": "The patient's sex and age, the record's date span, and "
             "each resource type in the record with its count and the codes and names it holds.",
             "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
            {"name": "fetch_resources", "description": "The resources of one type, one dated line each, "
             "oldest first; optionally only those whose code or name matches `code`, dated from `since` "
             "to `until` (inclusive).",
             "parameters": {"type": "object", "properties": {
                 "resource_type": {"type": "string", "enum": types},
                 "code": {"type": "string", "enum": codes or ["none"],
                          "description": "a code or a name from the manifest, e.g. 2823-3 or Potassium"},
                 "since": {"type": "string", "pattern": _DATE},
                 "until": {"type": "string", "pattern": _DATE},
             }, "required": ["resource_type"], "additionalProperties": False}},
        ])

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """The tool's result text (a bad argument gets a sentence saying so, as a tool error would)."""
        if name == "get_manifest":
            return self.manifest()
        if name == "fetch_resources":
            return self.fetch(**arguments)
        return f"unknown tool {name!r}"

    def manifest(self) -> str:
        lines = [self.timeline.fixed_sections()[0].text]  # "PATIENT: sex, age ...; record up to ..."
        first = next((e.when for e in self.timeline.events if e.when), "")
        if first:
            lines.append(f"RECORD DATES: {first} to {self.timeline.as_of}")
        for kind, events in sorted(self.by_type.items()):
            codes = OrderedDict()
            for e in events:
                codes.setdefault(_code(e) or e.name, e.name)
            shown = [f"{c} {n}" if c != n else n for c, n in list(codes.items())[:CODES_SHOWN]]
            more = f", and {len(codes) - CODES_SHOWN} more" if len(codes) > CODES_SHOWN else ""
            lines.append(f"{kind}: {len(events)} (" + "; ".join(shown) + more + ")")
        return "\n".join(lines)

    def fetch(self, resource_type: str, code: str | None = None, since: str | None = None,
              until: str | None = None) -> str:
        events = self.by_type.get(resource_type)
        if not events:
            return f"the record holds no {resource_type} resources"
        wanted = (code or "").strip().lower()
        found = [e for e in events
                 if (not wanted or wanted in (_code(e).lower(), e.code.lower()) or wanted in e.name.lower())
                 and (not since or e.when[:10] >= since) and (not until or (e.when[:10] and e.when[:10] <= until))]
        if not found:
            return f"no {resource_type} resources match" + (f" code {code!r}" if code else "") + \
                (" in those dates" if since or until else "")
        kept, used = [], 0
        for e in reversed(found):  # the most recent that fit, shown oldest first
            size = self.count(event_line(e) + "\n")
            if used + size > self.result_tokens:
                break
            kept.append(e)
            used += size
        lines = [event_line(e) for e in reversed(kept)]
        if len(kept) < len(found):
            lines.insert(0, f"({len(found) - len(kept)} earlier entries not shown; narrow with since/until)")
        return "\n".join(lines)


def _code(e: Event) -> str:
    """The code part of "system|code"."""
    return e.code.rpartition("|")[2]


@dataclass
class AgentResult:
    """One question's answer, its steps ({"call", "result"}) and the whole conversation (OpenAI shape)."""

    question: str
    answer: str
    steps: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    stopped: str  # "answered", or "step_limit" when the last step had to answer
    # messages: the system and user turns, assistant turns with tool_calls, tool results; for a base model
    # the last user message is the completion prompt of the answer ("completion": true)

    def transcript(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "stopped": self.stopped, "steps": self.steps,
                "messages": self.messages}


@dataclass
class _Open:
    tools: RecordTools
    question: str
    answer_type: str | None
    messages: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    stopped: str = "answered"

    @property
    def has_manifest(self) -> bool:
        return any(s["call"]["name"] == "get_manifest" for s in self.steps)


class RecordsAgent:
    """Answers questions about records by tool calls; `pipe` is a medgem Pipeline (it needs `complete` with
    message prompts and a grammar). Records are cached per path, like `qa.Asker`."""

    def __init__(self, pipe: Any, *, max_steps: int = MAX_STEPS, result_tokens: int = RESULT_TOKENS,
                 deid: bool = False, seed: int = 0, lenient: bool = False, patient_id: str | None = None,
                 completion_answer: bool | None = None):
        if max_steps < 2:
            raise InputError("the agent needs at least 2 steps (a call and an answer)")
        if not hasattr(pipe, "complete") or not hasattr(pipe, "grammars"):
            raise InputError("the records agent needs a medgem Pipeline (constrained tool calls)")
        self.pipe, self.max_steps, self.result_tokens = pipe, max_steps, result_tokens
        self.deid, self.seed, self.lenient, self.patient_id = deid, seed, lenient, patient_id
        # The answer as a completion prompt (base models; see the module text), else as a chat turn.
        self.completion_answer = getattr(pipe, "base_model", False) if completion_answer is None else completion_answer
        self._tools: OrderedDict[str, RecordTools] = OrderedDict()

    def count(self, text: str) -> int:
        return len(self.pipe.tokenizer.encode(text, add_bos=False))

    def tools(self, record: str | Path | Record) -> RecordTools:
        if isinstance(record, Record):
            return RecordTools(deidentify(record, self.seed) if self.deid else record, self.count, self.result_tokens)
        key = str(record)
        if key not in self._tools:
            if len(self._tools) >= 8:  # QA files are grouped by record: keep only a few
                self._tools.popitem(last=False)
            loaded = load_record(record, lenient=self.lenient, patient_id=self.patient_id)
            self._tools[key] = self.tools(loaded)
        return self._tools[key]

    def ask(self, record: str | Path | Record, question: str, answer_type: str | None = None,
            on_step: Callable[[int, dict[str, Any]], None] | None = None) -> AgentResult:
        """One question; `on_step(step, {"call", "result"})` sees each call as it happens."""
        return self.ask_batch([(record, question, answer_type)], on_step)[0]

    def ask_batch(self, jobs: list[tuple[str | Path | Record, str, str | None]],
                  on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[AgentResult]:
        """Several (record, question, answer_type) in lockstep: one batched generation per step."""
        runs = []
        for record, question, answer_type in jobs:
            tools = self.tools(record)
            kind = answer_type if answer_type in ANSWER_TYPES else None
            system = INSTRUCTIONS + "\n\n" + toolfmt.system_text(tools.specs)
            runs.append(_Open(tools, question, kind, [{"role": "system", "content": system},
                                                {"role": "user", "content": f"{question}\n{FORMATS[kind]}"}]))
        for step in range(self.max_steps):
            todo = [r for r in runs if r.answer is None]
            if not todo:
                break
            if step == self.max_steps - 1:
                self._answer(todo)
                break
            choice = "required" if step == 0 or self.completion_answer else "auto"
            groups: dict[tuple[int, bool], list[_Open]] = {}
            for r in todo:
                groups.setdefault((id(r.tools), r.has_manifest), []).append(r)
            for group in groups.values():
                self._call(group, step, choice, on_step)
        return [AgentResult(r.question, r.answer or "", r.steps, r.messages, r.stopped) for r in runs]

    def _call(self, group: list[_Open], step: int, choice: str,
              on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
        """One step that may (auto) or must (required) call a tool."""
        specs = [s for s in group[0].tools.specs if not (group[0].has_manifest and s.name == "get_manifest")]
        grammar = toolfmt.call_grammar(specs, choice, parallel=False)
        prompts = [toolfmt.history([dict(m) for m in r.messages]) for r in group]
        texts = self.pipe.generate_batch(prompts, temperature=0.0, stop=["\n"], grammar=grammar,
                                         max_new_tokens=CALL_TOKENS)
        for r, text in zip(group, texts, strict=True):
            calls = toolfmt.parse_calls(text, specs)
            if not calls:
                r.answer = _first_line(text)
                if text.lstrip().startswith("["):  # a call cut off: CALL_TOKENS is meant to rule it out
                    r.stopped = "incomplete_call"
                r.messages.append({"role": "assistant", "content": r.answer})
                continue
            r.messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call in calls:
                name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
                result = r.tools.call(name, arguments)
                record = {"call": {"name": name, "arguments": arguments}, "result": result}
                r.steps.append(record)
                r.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                if on_step:
                    on_step(step + 1, record)

    def _answer(self, group: list[_Open]) -> None:
        """The last step: an answer, as a chat turn or (base models) an `ehr ask` completion prompt."""
        for r in group:
            r.stopped = "step_limit"
            if self.completion_answer:
                record = "\n\n".join(s["result"] for s in r.steps) or "(nothing fetched)"
                r.messages.append({"role": "user", "content": build_prompt(record, r.question, r.answer_type),
                                   "completion": True})
            else:
                r.messages.append({"role": "user", "content": FINAL_NUDGE})
        if self.completion_answer:
            texts = self.pipe.generate_batch([r.messages[-1]["content"] for r in group], raw=True, temperature=0.0,
                                             stop=STOP, max_new_tokens=MAX_NEW_TOKENS)
        else:
            texts = self.pipe.generate_batch([toolfmt.history([dict(m) for m in r.messages]) for r in group],
                                             temperature=0.0, stop=STOP, max_new_tokens=MAX_NEW_TOKENS)
        for r, text in zip(group, texts, strict=True):
            r.answer = _first_line(text)
            r.messages.append({"role": "assistant", "content": r.answer})


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def transcript_name(item_id: str) -> str:
    """A file name for an item's transcript (ids come from data files; keep them path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id)[:120] + ".json"
