"""The records agent: its tools over real synthetic FHIR files, and the loop on the real embedded model
(every call parses and follows the tool's schema, the step limit holds, de-identification reaches the model)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from medgem.ehr.agent import RecordsAgent, RecordTools
from medgem.ehr.deid import deidentify


def test_tools_filter_by_type_code_and_date(records, count_tokens):
    tools = RecordTools(records[0], count_tokens, result_tokens=10_000)
    manifest = tools.manifest()
    observations = tools.by_type["Observation"]
    assert f"Observation: {len(observations)} (" in manifest and "2823-3 Potassium" in manifest
    potassium = [e for e in observations if e.code.endswith("|2823-3")]
    by_code = tools.fetch("Observation", code="2823-3").splitlines()
    assert len(by_code) == len(potassium) and all("Potassium" in line for line in by_code)
    assert tools.fetch("Observation", code="potassium").splitlines() == by_code  # a name works too
    middle = potassium[len(potassium) // 2].when
    later = tools.fetch("Observation", code="2823-3", since=middle).splitlines()
    assert len(later) == sum(e.when >= middle for e in potassium) and all(line[:10] >= middle for line in later)
    assert "no Observation resources match" in tools.fetch("Observation", code="2823-3", until="1900-01-01")
    assert tools.fetch("Basic") == "the record holds no Basic resources"


def test_tool_results_stay_within_their_token_budget(records, count_tokens):
    tools = RecordTools(records[0], count_tokens, result_tokens=120)
    text = tools.fetch("Observation")
    assert count_tokens(text) <= 120 + 30 and text.startswith("(") and "earlier entries not shown" in text
    assert text.splitlines()[-1][:10] == tools.by_type["Observation"][-1].when  # the most recent are kept


def test_the_agent_on_the_embedded_model(real_pipe, bundle_files, patients):
    """Real 270M: the calls are the grammar's, so each parses and validates; 2 steps = 1 call + 1 answer."""
    patient = patients[0]
    agent = RecordsAgent(real_pipe, max_steps=2, result_tokens=200, deid=True)
    seen = []
    result = agent.ask(bundle_files[0], patient.qa[0]["question"], patient.qa[0]["answer_type"],
                       on_step=lambda step, call: seen.append((step, call)))
    assert len(result.steps) == 1 and seen == [(1, result.steps[0])] and result.stopped == "step_limit"
    specs = {s.name: s.parameters for s in agent.tools(bundle_files[0]).specs}
    for step in result.steps:
        jsonschema.validate(step["call"]["arguments"], specs[step["call"]["name"]])
    calls = [m for m in result.messages if m.get("tool_calls")]
    assert len(calls) == 1 and json.loads(calls[0]["tool_calls"][0]["function"]["arguments"]) == \
        result.steps[0]["call"]["arguments"]
    # De-identified: no name, MRN or phone of the patient anywhere the model looked.
    seen_text = json.dumps(result.transcript())
    resource = patient.bundle["entry"][0]["resource"]
    assert resource["resourceType"] == "Patient"
    for secret in [resource["name"][0]["family"], *(i["value"] for i in resource["identifier"])]:
        assert secret not in seen_text


def test_a_step_limit_below_two_is_refused(real_pipe):
    from medgem.errors import InputError

    with pytest.raises(InputError, match="at least 2 steps"):
        RecordsAgent(real_pipe, max_steps=1)


def test_deid_happens_before_the_tools(records, count_tokens):
    record = records[1]
    plain, private = RecordTools(record, count_tokens), RecordTools(deidentify(record, 3), count_tokens)
    assert plain.manifest() != private.manifest()  # dates shifted
    assert record.patient.birth_date not in private.manifest()


def test_eval_refuses_the_agent_without_fhir_files(tmp_path):
    from medgem.errors import InputError
    from medgem.eval.runner import RunConfig
    from medgem.eval.tasks import load_task

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "yes", "answer_type": "yes_no", "context": "x"}) + "\n")
    with pytest.raises(InputError, match="needs an EHR-QA set whose items name a 'bundle'"):
        RunConfig(method="agent").validate(load_task("ehrqa", data))
