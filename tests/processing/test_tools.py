"""The Gemma 3 tool-call format: history rendering, the call grammar (llguidance on Gemma's real
vocabulary), and parsing whole and streamed answers."""

from __future__ import annotations

import json

import pytest

from medgem.engine.constraints import Constraint
from medgem.errors import InputError
from medgem.processing.tokenizer import render_chat
from medgem.processing.tools import CallStream, call_grammar, history, parse_calls, system_text, tool_specs

TOOLS = [{"type": "function", "function": {"name": "fetch", "description": "Resources of one type.",
                                           "parameters": {"type": "object", "properties": {
                                               "type": {"enum": ["Observation", "Condition"]},
                                               "since": {"type": "string", "maxLength": 10}},
                                               "required": ["type"]}}},
         {"type": "function", "function": {"name": "manifest"}}]
CALLS = '[{"name": "fetch", "arguments": {"type": "Observation", "since": "2026-01-01"}}, {"name": "manifest", "arguments": {}}]'


def test_history_renders_calls_and_results_as_alternating_turns():
    messages = [
        {"role": "user", "content": "Latest labs?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "fetch", "arguments": '{"type": "Observation"}'}},
            {"id": "c2", "type": "function", "function": {"name": "manifest", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "HbA1c 7.2 %"},
        {"role": "tool", "tool_call_id": "c2", "content": "Observation: 3"},
    ]
    text = render_chat([{"role": "system", "content": system_text(tool_specs(TOOLS))}, *history(messages)])
    assert text.count("<start_of_turn>user") == 2 and text.count("<start_of_turn>model") == 2
    assert '[{"name": "fetch", "arguments": {"type": "Observation"}}, {"name": "manifest", "arguments": {}}]' in text
    assert '<tool_response>\n{"name": "fetch", "content": "HbA1c 7.2 %"}\n</tool_response>' in text
    assert '"name": "manifest"' in text.split("<end_of_turn>")[0]  # the tool list is in the first turn
    with pytest.raises(InputError, match="answers no tool call"):
        history([messages[0], {"role": "tool", "tool_call_id": "c9", "content": "x"}])


def test_call_grammar_accepts_valid_calls_only(real_pipe):
    specs = tool_specs(TOOLS)
    tok = real_pipe.tokenizer

    def accepts(choice: str, text: str, parallel: bool = True) -> bool:
        matcher = real_pipe.grammars.compile(Constraint.grammar(call_grammar(specs, choice, parallel))).matcher()
        return all(matcher.accept(t) for t in tok.encode(text, add_bos=False))

    assert accepts("required", CALLS) and accepts("auto", CALLS) and accepts("auto", "No tool fits this question.")
    assert not accepts("required", "No tool fits.")
    assert not accepts("required", CALLS, parallel=False)
    assert not accepts("required", '[{"name": "fetch", "arguments": {"type": "Patient"}}]')  # outside the enum
    assert not accepts("manifest", CALLS) and accepts("manifest", '[{"name": "manifest", "arguments": {}}]')
    with pytest.raises(InputError, match="not among the tools"):
        call_grammar(specs, "delete", True)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_streamed_calls_equal_the_parsed_answer(step):
    specs = tool_specs(TOOLS)
    whole = parse_calls(CALLS, specs)
    stream, deltas = CallStream(), []
    for i in range(0, len(CALLS), step):
        deltas += stream.feed(CALLS[i:i + step])
    heads = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [h["function"]["name"] for h in heads] == ["fetch", "manifest"] and heads[0]["index"] == 0
    for k, call in enumerate(whole):
        args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if d["tool_calls"][0]["index"] == k)
        assert json.loads(args) == json.loads(call["function"]["arguments"])
    assert CallStream().feed("Plain answer.") == [{"content": "Plain answer."}]
    assert parse_calls("Plain answer.", specs) is None and parse_calls('[{"name": "nope", "arguments": {}}]', specs) is None
