"""Constrained decoding, logit adjustments and logprobs on the real embedded Gemma 3 270M.

Every constrained output is checked against its constraint (jsonschema, re.fullmatch, the choice
list); the continuous-batching tests compare a request's greedy text in a mixed batch, with chunked
prefill and with speculative decoding against the same request decoded alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from medgem.engine.logits import adjust
from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Request, Scheduler
from medgem.engine.speculative import Drafter, PromptLookup
from medgem.errors import InputError

SCHEMA = {
    "type": "object",
    "properties": {
        "finding": {"enum": ["pneumonia", "effusion", "normal"]},
        "side": {"enum": ["left", "right", "both"]},
        "severity": {"type": "integer", "minimum": 1, "maximum": 5},
        "notes": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 12}},
    },
    "required": ["finding", "side", "severity", "notes"],
    "additionalProperties": False,
}
REGEX = r"(19|20)\d\d-(0[1-9]|1[0-2])-\d\d"
CHOICES = ["benign", "malignant", "indeterminate"]
REPORT = ("Chest X-ray report. Findings: dense opacity in the right lower lobe, consistent with pneumonia. "
          "Date of study:")


@pytest.fixture(scope="module")
def grammars(real_pipe):
    return {"json": real_pipe.constraint(json_schema=SCHEMA), "regex": real_pipe.constraint(regex=REGEX),
            "choice": real_pipe.constraint(choice=CHOICES)}


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text


def _requests(pipe, grammars, max_new: int = 32, kinds=("json", "regex", None)) -> list[Request]:
    prompt = pipe.tokenizer.encode(REPORT, add_bos=True)
    return [Request(prompt, SamplingParams(max_new_tokens=max_new, constraint=grammars[k] if k else None),
                    request_id=k or "plain") for k in kinds]


def _drive(scheduler: Scheduler, requests: list[Request]) -> dict[str, str]:
    return {e.request_id: e.completion.text for e in scheduler.drive(requests) if e.done}


def test_pipeline_api_outputs_match_their_constraints(real_pipe):
    texts = real_pipe.generate_batch([REPORT, "Patient summary in JSON:"], raw=True, json_schema=SCHEMA,
                                     max_new_tokens=40)
    for text in texts:
        _check("json", text)
    _check("regex", real_pipe.generate(REPORT, raw=True, regex=REGEX, max_new_tokens=16))
    _check("choice", real_pipe.generate("The lesion is", raw=True, choice=CHOICES, max_new_tokens=8))
    hits = real_pipe.grammars.hits
    assert real_pipe.constraint(json_schema=dict(reversed(SCHEMA.items()))) is real_pipe.constraint(json_schema=SCHEMA)
    assert real_pipe.grammars.hits == hits + 2  # compiled once, then from the cache (keys in any order)


def test_mixed_batch_chunked_prefill_and_prompt_lookup_equal_decoding_alone(real_pipe, grammars):
    alone = _drive(Scheduler(real_pipe.engine, max_slots=1, prefix_cache_mb=0), _requests(real_pipe, grammars))
    for kind, text in alone.items():
        if kind != "plain":
            _check(kind, text)
    mixed = _drive(Scheduler(real_pipe.engine, max_slots=3, prefill_chunk=8), _requests(real_pipe, grammars))
    assert mixed == alone
    lookup = _drive(Scheduler(real_pipe.engine, max_slots=4, draft=PromptLookup(k=4)), _requests(real_pipe, grammars))
    assert lookup == alone


def test_draft_model_drafts_outside_the_mask_are_rejected(real_pipe, grammars):
    """The draft (the same model, unconstrained) proposes tokens the grammar refuses: they must be
    rejected, leaving exactly the constrained greedy text."""
    alone = _drive(Scheduler(real_pipe.engine, max_slots=1), _requests(real_pipe, grammars, 16, ["json"]))
    drafter = Drafter(real_pipe.model, k=2)
    assert _drive(Scheduler(real_pipe.engine, max_slots=1, draft=drafter),
                  _requests(real_pipe, grammars, 16, ["json"])) == alone
    assert drafter.accepted < drafter.proposed  # some drafts broke the grammar and were refused


def test_logprobs_are_the_models_log_softmax(real_pipe):
    prompt = real_pipe.tokenizer.encode("The heart has four", add_bos=True)
    done = [e for e in Scheduler(real_pipe.engine, max_slots=1).drive(
        [Request(prompt, SamplingParams(max_new_tokens=4, logprobs=5), prompt_logprobs=3)]) if e.done][0]
    completion = done.completion
    ids = prompt + completion.token_ids
    with torch.inference_mode():
        reference = torch.log_softmax(real_pipe.model(torch.tensor([ids])).float()[0], -1)
    for i, entry in enumerate(completion.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert entry.token == completion.token_ids[i]
        assert abs(entry.logprob - float(row[entry.token])) < 1e-4
        assert len(entry.top) == 5 and entry.top[0][0] == int(row.argmax())
        assert abs(entry.top[0][1] - float(row.max())) < 1e-4
    assert [e.token for e in completion.prompt_logprobs] == prompt[1:]
    for p, entry in enumerate(completion.prompt_logprobs):
        assert abs(entry.logprob - float(reference[p, prompt[p + 1]])) < 1e-4


def test_bias_and_penalties():
    logits = torch.zeros(8)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={3: 5.0})
    out = adjust(logits, p, [2, 2, 4], None)
    assert out.tolist() == [0, 0, -2.0, 5.0, -1.5, 0, 0, 0]
    assert logits.tolist() == [0.0] * 8  # the model's logits are left alone (logprobs read them)
    with pytest.raises(InputError):
        SamplingParams(logprobs=21)


def test_logit_bias_steers_greedy_decoding(real_pipe):
    target = real_pipe.tokenizer.encode(" banana", add_bos=False)[0]
    text = real_pipe.generate("The heart has four", raw=True, max_new_tokens=2, logit_bias={target: 100.0})
    assert text == " banana banana"


@pytest.mark.parametrize("kind, value, message", [
    ("json_schema", {"type": "objekt"}, "json schema is invalid"),
    ("json_schema", "{not json", "not valid JSON"),
    ("regex", "(abc", "regex is invalid"),
    ("regex", "[a&&b]", "can never be satisfied"),
    ("grammar", "start: missing_rule", "grammar is invalid"),
    ("choice", [], "non-empty list"),
])
def test_bad_constraints_are_refused_by_name(real_pipe, kind, value, message):
    with pytest.raises(InputError, match=message):
        real_pipe.constraint(**{kind: value})
    with pytest.raises(InputError, match="one output constraint"):
        real_pipe.constraint(regex="a", choice=["a"])


def test_constraint_with_an_image_in_the_prompt(tiny_medgemma):
    from PIL import Image

    import medgem

    tiny_pipe = medgem.load(tiny_medgemma, dtype="float32")
    image = Image.new("RGB", (28, 28), (120, 40, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Side?"}]}]
    texts = tiny_pipe.generate_batch([messages, messages], choice=["left", "right"], max_new_tokens=4)
    assert all(t in ("left", "right") for t in texts)
    ids, pixels = tiny_pipe.prompt_inputs(messages)
    grammar = tiny_pipe.constraint(regex=r"[a-z]{2,5}")
    done = [e for e in Scheduler(tiny_pipe.engine, max_slots=2).drive(
        [Request(ids, SamplingParams(max_new_tokens=8, constraint=grammar), pixel_values=pixels)]) if e.done]
    assert re.fullmatch(r"[a-z]{2,5}", done[0].completion.text)
