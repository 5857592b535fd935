"""Structured outputs, tool calls and logprobs through the official `openai` client, against a real
server on loopback with the embedded Gemma 3 270M (greedy, so answers are reproducible)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

MODEL = "gemma-3-270m"
SCHEMA = {
    "type": "object",
    "properties": {
        "patient": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                     "sex": {"enum": ["female", "male", "unknown"]}},
                    "required": ["age", "sex"], "additionalProperties": False},
        "findings": {"type": "array", "minItems": 1, "maxItems": 2,
                     "items": {"enum": ["opacity", "effusion", "nodule", "normal"]}},
        "urgent": {"type": "boolean"},
    },
    "required": ["patient", "findings", "urgent"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA, "strict": True}}
FINDINGS = ["a right lower lobe opacity", "a small left pleural effusion", "a 6 mm nodule", "no acute findings"]
TOOLS = [{"type": "function", "function": {
    "name": "get_observations", "description": "Lab results of the patient, by LOINC code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]{1,5}-[0-9]$"},
                                                    "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["code"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_conditions", "description": "The patient's problem list."}}]


@pytest.fixture(scope="module")
def client(text_server):
    return openai.OpenAI(base_url=f"{text_server}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, finding: str, stream: bool) -> str:
    messages = [{"role": "user", "content": f"Chest X-ray of a 70-year-old man shows {finding}. Give the JSON."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=64, temperature=0, response_format=FORMAT)
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(**kwargs, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_answers_validate_streamed_and_not(client):
    jobs = [(f, stream) for f in FINDINGS for stream in (False, True)]  # one batch of 8 (benchmarks/structured.py
    # runs 20 prompts)
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: _ask(client, *job), jobs))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts[0::2] == texts[1::2]  # streaming changes nothing
    assert len(set(texts)) > 1  # the prompts matter


def test_json_object_regex_and_choice(client):
    question = [{"role": "user", "content": "Describe the lesion."}]
    reply = client.chat.completions.create(model=MODEL, messages=question, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert isinstance(json.loads(text), dict) or reply.choices[0].finish_reason == "length"
    reply = client.completions.create(model=MODEL, prompt="The study was done on", max_tokens=16, temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", reply.choices[0].text)
    reply = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0,
                                           extra_body={"structured_outputs": {"choice": ["benign", "malignant"]}})
    assert reply.choices[0].message.content in ("benign", "malignant")
    grammar = 'start: "BI-RADS " /[0-6]/'
    reply = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0,
                                           extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"BI-RADS [0-6]", reply.choices[0].message.content)


def test_required_tool_call_then_a_two_turn_loop(client):
    messages = [{"role": "user", "content": "What was the patient's last HbA1c (LOINC 4548-4)?"}]
    one = dict(tools=TOOLS, parallel_tool_calls=False)  # a base model would list calls without end
    reply = client.chat.completions.create(model=MODEL, messages=messages, tool_choice="required", **one,
                                           max_tokens=48, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name in ("get_observations", "get_conditions")
    spec = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec)

    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, **one, max_tokens=48,
                                                   tool_choice="required", temperature=0, stream=True))
    deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas if d.index == 0) == call.function.arguments
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"

    named = client.chat.completions.create(model=MODEL, messages=messages, **one, max_tokens=48,
                                           tool_choice={"type": "function", "function": {"name": "get_conditions"}},
                                           temperature=0)
    assert named.choices[0].message.tool_calls[0].function.name == "get_conditions"

    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"value": "7.2 %", "date": "2026-11-02"}'}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=12, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None


def test_logprobs_shapes_and_values(client, real_pipe):
    question = [{"role": "user", "content": "Name a heart valve."}]
    reply = client.chat.completions.create(model=MODEL, messages=question, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    ids = real_pipe.prompt_ids(question)
    with torch.inference_mode():
        first = torch.log_softmax(real_pipe.model(torch.tensor([ids])).float()[0, -1], -1)
    assert abs(content[0].logprob - float(first.max())) < 1e-4
    assert content[0].top_logprobs[0].logprob == content[0].logprob
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=question, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [c.token for c in content]

    done = client.completions.create(model=MODEL, prompt="The aorta is", max_tokens=3, temperature=0, logprobs=2,
                                     echo=True)
    lp = done.choices[0].logprobs
    prompt_len = len(real_pipe.tokenizer.encode("The aorta is"))
    assert done.choices[0].text.startswith("The aorta is")
    assert len(lp.tokens) == prompt_len + 3 and lp.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[-1]) == 2


def test_tokenize_detokenize_bias_and_penalties(text_server, real_pipe):
    http = httpx.Client(base_url=text_server, timeout=60)
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": "HbA1c 7.2 %"}).json()
    assert ids["tokens"] == real_pipe.tokenizer.encode("HbA1c 7.2 %") and ids["count"] == len(ids["tokens"])
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ids["tokens"][1:]}).json()["prompt"] == "HbA1c 7.2 %"
    chat = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == real_pipe.prompt_ids([{"role": "user", "content": "Hi"}])
    banana = real_pipe.tokenizer.encode(" banana", add_bos=False)[0]
    body = {"model": MODEL, "prompt": "The heart has four", "max_tokens": 2, "temperature": 0}
    assert http.post("/v1/completions", json={**body, "logit_bias": {str(banana): 100}}).json()[
        "choices"][0]["text"] == " banana banana"
    plain = real_pipe.generate(body["prompt"], raw=True, max_new_tokens=8)
    for penalty in ("frequency_penalty", "presence_penalty"):  # the values reach the engine (the math: tests/engine)
        expected = real_pipe.generate(body["prompt"], raw=True, max_new_tokens=8, **{penalty: -2.0})
        got = http.post("/v1/completions", json={**body, "max_tokens": 8, penalty: -2.0}).json()["choices"][0]["text"]
        assert got == expected != plain


@pytest.mark.parametrize("extra, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "invalid"),
    ({"structured_outputs": {"regex": "[a&&b]"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex is invalid"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "delete_patient"}}},
     "tool_choice", "delete_patient"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"logit_bias": {"hello": 5}}, "logit_bias", "not a token id"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "tools": TOOLS},
     "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_conditions", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "[]"}], "tools": TOOLS}, "messages", "not valid JSON"),
])
def test_bad_requests_are_400s_that_name_the_problem(text_server, extra, param, says):
    http = httpx.Client(base_url=text_server, timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"
    assert http.get("/health").json() == {"status": "ok"}
