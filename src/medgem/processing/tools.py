"""Tool calling for Gemma 3, which has no tool tokens: the prompt format, the grammar that constrains a
call to the tools' JSON schemas, and the parser (whole answers and streamed text).

The format: the tools' names, descriptions and argument schemas go into the system text (folded into
the first user turn); the model calls tools by answering with nothing but a JSON list,
`[{"name": "fetch_resources", "arguments": {"resource_type": "Observation"}}]`; each result comes
back in the next user turn as `<tool_response>{"name": ..., "content": ...}</tool_response>`, the
block vLLM's Gemma 3 template uses. Why JSON calls rather than that template's Python calls
(`[get_x(code="4548-4")]`): OpenAI carries arguments as a JSON object, and the template writes the
values with `tojson`, so `true`/`null` arrive inside Python syntax that vLLM's `ast` parser reads as
names; JSON round-trips exactly. And llguidance embeds each tool's parameter schema in the call
grammar unchanged (`%json`), so a constrained call always parses and validates; a Python-call grammar
would have to re-derive keyword order and optional arguments from the schema. Google's EHR navigator
likewise prompts MedGemma for JSON, not a template. With tool_choice "auto" the grammar allows plain
text too (anything that does not start with `[`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from medgem.errors import InputError

TOOL_RESPONSE = ("<tool_response>\n", "\n</tool_response>")
# The argument JSON inside a call: compact and fixed, like every JSON this server constrains.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


def tool_specs(tools: list[dict[str, Any]]) -> list[ToolSpec]:
    """OpenAI `tools` entries ({"type": "function", "function": {...}}) as specs; InputError on bad ones."""
    specs, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"tools[{i}] has no function name")
        if name in seen:
            raise InputError(f"tools[{i}]: the function name {name!r} is used twice")
        seen.add(name)
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise InputError(f"tools[{i}] ({name}): parameters must be a JSON Schema of type object")
        specs.append(ToolSpec(name, fn.get("description") or "", params))
    return specs


def system_text(specs: list[ToolSpec]) -> str:
    """The instructions and tool list that go into the system text."""
    listing = "\n".join(json.dumps({"name": s.name, "description": s.description, "parameters": s.parameters},
                                   ensure_ascii=False) for s in specs)  # one tool per line: few prompt tokens
    return ("You can call these functions; each one's arguments follow its JSON Schema:\n" + listing + "\n\n"
            "To call functions, answer with nothing but a JSON list of calls, for example "
            '[{"name": "function_name", "arguments": {"argument": "value"}}]. The results come back in '
            "<tool_response> blocks; then answer the user in plain text. If no function fits, answer in plain "
            "text.")


def render_calls(calls: list[dict[str, Any]]) -> str:
    """Calls ({"name", "arguments": dict}) as the model writes them."""
    return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)


def history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with OpenAI tool traffic rewritten into Gemma turns.

    An assistant message's `tool_calls` become its text (the JSON list); consecutive `tool` messages
    (with any user message right after them) become one user turn of <tool_response> blocks. Each tool
    message must answer a call of the assistant message before it, by `tool_call_id`.
    """
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, of the latest assistant calls
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            names = {}
            for j, call in enumerate(msg["tool_calls"]):
                fn = call.get("function") or {}
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except json.JSONDecodeError:
                    raise InputError(f"messages[{i}].tool_calls[{j}]: function.arguments is not valid JSON") from None
                if not isinstance(arguments, dict):
                    raise InputError(f"messages[{i}].tool_calls[{j}]: function.arguments must be a JSON object")
                names[call.get("id")] = fn.get("name")
                calls.append({"name": fn.get("name"), "arguments": arguments})
            text = msg.get("content") if isinstance(msg.get("content"), str) else ""
            out.append({"role": "assistant", "content": ((text.strip() + "\n") if text and text.strip() else "")
                        + render_calls(calls)})
            continue
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not call_id:
                raise InputError(f"messages[{i}]: a tool message needs the tool_call_id it answers")
            if call_id not in names:
                raise InputError(f"messages[{i}]: tool_call_id {call_id!r} answers no tool call of the assistant "
                                 "message before it")
            content = msg.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise InputError(f"messages[{i}]: a tool message's content must be text")
            block = TOOL_RESPONSE[0] + json.dumps({"name": names[call_id], "content": content},
                                                  ensure_ascii=False) + TOOL_RESPONSE[1]
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
            continue
        if role == "user" and out and out[-1].get("_tool") and isinstance(msg.get("content"), str):
            out[-1]["content"] += "\n\n" + msg["content"]
            continue
        if role == "assistant" and msg.get("content") is None:
            raise InputError(f"messages[{i}]: an assistant message needs content or tool_calls")
        out.append(msg)
    for msg in out:
        msg.pop("_tool", None)
    return out


def call_grammar(specs: list[ToolSpec], choice: str, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) for the answer: tool calls whose arguments follow each tool's
    schema. choice: "required" (at least one call), "auto" (calls or plain text), or one function's name."""
    chosen = [s for s in specs if s.name == choice] if choice not in ("auto", "required") else specs
    if not chosen:
        raise InputError(f"tool_choice names {choice!r}, which is not among the tools")
    rules = []
    for k, spec in enumerate(chosen):
        schema = {**spec.parameters, "x-guidance": _JSON_STYLE}
        head = json.dumps('{"name": ' + json.dumps(spec.name) + ', "arguments": ')
        rules.append(f"call_{k}: {head} args_{k} \"}}\"\nargs_{k}: %json {json.dumps(schema)}")
    call = "call: " + " | ".join(f"call_{k}" for k in range(len(chosen)))
    calls = 'calls: "[" call ("," " " call)* "]"' if parallel else 'calls: "[" call "]"'
    start = "start: calls | TEXT\nTEXT: /[^\\[\\s][\\s\\S]*/" if choice == "auto" else "start: calls"
    return "\n".join([start, calls, call, *rules]) + "\n"


def parse_calls(text: str, specs: list[ToolSpec]) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from an answer that is a JSON list of calls to known tools; None otherwise."""
    stripped = text.strip()
    if not stripped.startswith("["):
        return None
    try:
        calls = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    known = {s.name for s in specs}
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and c.get("name") in known and isinstance(c.get("arguments"), dict) for c in calls):
        return None
    return [openai_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def openai_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


# The start of a call: after "[" (the first) or after the previous call's "}" and ",".
_CALL_HEAD = re.compile(r'\s*\}?\s*[\[,]\s*\{"name":\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments":\s*(?=\S)')


@dataclass
class CallStream:
    """Streamed answer text -> OpenAI deltas: content text, or tool calls as OpenAI streams them (one
    delta with the id and name, then pieces of the arguments' JSON text).

    The first non-blank character decides: `[` starts tool calls (the grammar makes the rest a list of
    calls), anything else is content. `tools_only` (tool_choice required or named) skips the wait.
    """

    tools_only: bool = False
    mode: str | None = None  # "content" or "calls", once decided
    buffer: str = ""
    pos: int = 0  # of buffer: scanned up to here
    index: int = -1  # the call being streamed
    depth: int = 0  # of the arguments' JSON, while streaming them
    in_string: bool = False
    escaped: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for the next piece of text: {"content": ...} or {"tool_calls": [...]}."""
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head:
                return []
            self.mode = "calls" if self.tools_only or head.startswith("[") else "content"
        if self.mode == "content":
            out, self.pos = self.buffer[self.pos:], len(self.buffer)
            return [{"content": out}] if out else []
        return self._scan()

    def _scan(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while self.pos < len(self.buffer):
            if self.depth == 0:  # between calls: wait for the next head (or the closing bracket)
                match = _CALL_HEAD.match(self.buffer, self.pos)
                if match is None:
                    break
                self.index += 1
                call = openai_call(json.loads(match.group(1)), "")
                self.calls.append(call)
                head = {"id": call["id"], "type": "function", "function": {"name": call["function"]["name"],
                                                                            "arguments": ""}}
                deltas.append({"tool_calls": [{"index": self.index, **head}]})  # a copy: `call` grows
                self.pos = match.end()
                self.depth, self.in_string, self.escaped = -1, False, False  # -1: the object has not opened
                continue
            start, end = self.pos, self._args_end()
            piece = self.buffer[start:end]
            if piece:
                self.calls[self.index]["function"]["arguments"] += piece
                deltas.append({"tool_calls": [{"index": self.index, "function": {"arguments": piece}}]})
            self.pos = end
            if self.depth != 0:  # the arguments go on in the next piece
                break
        return deltas

    def _args_end(self) -> int:
        """Scan the arguments' JSON from pos; return where it ends (or the buffer's end), depth 0 when done."""
        i = self.pos
        while i < len(self.buffer):
            ch = self.buffer[i]
            i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth = 1 if self.depth < 0 else self.depth + 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i
        return i
