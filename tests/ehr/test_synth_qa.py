"""Synthetic patients and EHR-QA: deterministic by seed, answers that the timeline confirms, answer
extraction and exact match, and the `medgem ehr` commands through the real entry point."""

from __future__ import annotations

import json

import pytest

from medgem.ehr import qa
from medgem.ehr.synth import generate, make_patient
from medgem.ehr.timeline import Timeline

NOTICE_START = "[medgem is not a medical device"
FIELDS = {"patient_id", "bundle", "question", "answer", "answer_type", "evidence", "kind", "sex", "age_band"}


def test_generation_is_deterministic_by_seed(patients, seed):
    again = generate(3, seed)
    assert [p.bundle for p in again] == [p.bundle for p in patients[:3]]
    assert make_patient(seed, 7).bundle == patients[7].bundle  # patient i does not depend on how many
    assert generate(1, seed + 1)[0].bundle != patients[0].bundle


def test_histories_are_varied(patients):
    problems = {x["name"] for p in patients for x in p.facts["problems"]}
    assert len(problems) >= 10
    assert any(m["end"] for p in patients for m in p.facts["medications"])  # stops and dose changes
    assert {p.facts["sex"] for p in patients} == {"female", "male"}
    assert len({p.facts["age_band"] for p in patients}) == 4
    assert all(len(p.facts["labs"]["potassium"]) >= 3 for p in patients)
    assert sum(bool(p.facts["allergies"]) for p in patients) > 25


def test_answers_agree_with_the_timeline(patients, records):
    kinds = set()
    for p, record in zip(patients, records, strict=True):
        t = Timeline(record)
        labs = {}
        for e in t.of_kind("lab"):
            labs.setdefault(e.name.lower(), []).append(e)
        for item in p.qa:
            kinds.add(item["kind"])
            assert set(item) >= FIELDS - {"bundle"} and item["answer_type"] in qa.ANSWER_TYPES and item["evidence"]
            q = item["question"]
            if item["kind"] == "count_above":
                name = "hba1c" if "HbA1c" in q else "potassium"
                threshold = 7.0 if name == "hba1c" else 5.1
                assert item["answer"] == str(sum(e.value > threshold for e in labs[name]))
            elif item["kind"] == "allergy":
                substance = q.removeprefix("Is the patient allergic to ").removesuffix("?")
                assert item["answer"] == ("yes" if substance in {e.name for e in t.allergies()} else "no")
            elif item["kind"] == "latest_lab":
                name = q.removeprefix("What is the most recent ").removesuffix(" result?").lower()
                last = labs[name][-1]
                assert item["answer"] == f"{last.value:g} {last.unit}"
            elif item["kind"] == "med_start":
                drug = q.removeprefix("When was ").removesuffix(" started?")
                assert item["answer"] == min(e.when for e in t.of_kind("medication") if e.name == drug)
            elif item["kind"] == "imaging":
                assert item["answer"] == max(e.when for e in t.of_kind("imaging"))
    assert kinds >= {"latest_lab", "count_above", "allergy", "med_start", "imaging", "problem", "first_lab"}


@pytest.mark.parametrize(
    ("text", "answer_type", "expected"),
    [
        (" 4.2 mmol/L (ref 3.5-5.1)", "quantity", "4.2 mmol/L"),
        ("7.50%", "quantity", "7.5 %"),
        (" Yes, penicillin.", "yes_no", "yes"),
        ("no", "yes_no", "no"),
        (" 2019-3-4", "date", "2019-03-04"),
        ("on 3/14/2019.", "date", "2019-03-14"),
        ("2019-02-30", "date", ""),
        (" three", "count", "3"),
        ("007 results", "count", "7"),
        ("nothing useful", "count", ""),
    ],
)
def test_extract(text, answer_type, expected):
    assert qa.extract(text, answer_type) == expected


def test_exact_match_rules():
    assert qa.exact_match(" 4.2", "4.2 mmol/L", "quantity")
    assert qa.exact_match("4.20 mmol/L", "4.2 mmol/L", "quantity")
    assert not qa.exact_match("4.2 mg/dL", "4.2 mmol/L", "quantity")
    assert not qa.exact_match(" 4.3", "4.2 mmol/L", "quantity")
    assert qa.exact_match(" no.", "no", "yes_no") and not qa.exact_match("", "no", "yes_no")
    assert qa.infer_answer_type("When was metformin started?") == "date"
    assert qa.infer_answer_type("How many HbA1c results were above 7%?") == "count"
    assert qa.infer_answer_type("Is the patient allergic to penicillin?") == "yes_no"
    assert qa.infer_answer_type("What is the most recent potassium result?") == "quantity"
    prompt = qa.build_prompt("CONTEXT", "How many?", "count")
    assert prompt.startswith("Patient record:\nCONTEXT") and prompt.endswith("Answer with a whole number.\nAnswer:")


# --- CLI --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from medgem.cli import main

    out = tmp_path_factory.mktemp("synth")
    assert main(["ehr", "synth", "--patients", "3", "--seed", "5", "--out", str(out)]) == 0
    return out


def test_cli_synth_writes_bundles_truth_and_qa(synth_dir):
    items = [json.loads(line) for line in (synth_dir / "qa.jsonl").read_text().splitlines()]
    truth = [json.loads(line) for line in (synth_dir / "truth.jsonl").read_text().splitlines()]
    assert len(truth) == 3 and len({i["patient_id"] for i in items}) == 3
    assert all(set(i) >= FIELDS and (synth_dir / i["bundle"]).is_file() for i in items)
    assert [t["patient_id"] for t in truth] == [p.id for p in generate(3, 5)]


def test_cli_timeline_and_summary(run_cli, synth_dir):
    item = json.loads((synth_dir / "qa.jsonl").read_text().splitlines()[0])
    bundle = synth_dir / item["bundle"]
    code, out, err = run_cli("ehr", "timeline", bundle)
    assert code == 0 and err.startswith(NOTICE_START) and "\nTIMELINE:\n" in out and "LATEST LABS:" in out
    code, out, err = run_cli("ehr", "summarize", bundle, "--deid")
    assert code == 0 and out.startswith("PATIENT:") and "RECORD:" in out and "[NAME]" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ehr", "timeline", "{missing}"], "no such file"),
        (["ehr", "timeline", "{notjson}"], "not JSON"),
        (["ehr", "timeline", "{notfhir}"], "JSON but not FHIR"),
        (["ehr", "ask", "{notjson}"], 'ask needs RECORD and "question"'),
        (["ehr", "ask", "--qa", "{qa}"], "--qa needs --out"),
        (["ehr", "ask", "--qa", "{notjson}", "--out", "{out}"], "line 1: not JSON"),
        (["ehr", "synth", "--patients", "0", "--out", "{out}"], "--patients must be at least 1"),
    ],
)
def test_cli_errors_are_one_line_exit_2(run_cli, synth_dir, tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{{{")
    (tmp_path / "plain.json").write_text('{"a": 1}')
    paths = {"missing": tmp_path / "absent.json", "notjson": tmp_path / "bad.json", "notfhir": tmp_path / "plain.json",
             "qa": synth_dir / "qa.jsonl", "out": tmp_path / "preds.jsonl"}  # fmt: skip
    code, out, err = run_cli(*[a.format(**paths) for a in args])
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2 and err.strip().splitlines()[-1].startswith("medgem: error:")


@pytest.mark.slow
def test_cli_ask_batch_with_the_real_model(run_cli, synth_dir, tmp_path):
    preds = tmp_path / "preds.jsonl"
    code, out, err = run_cli("ehr", "ask", "--qa", synth_dir / "qa.jsonl", "--out", preds, "--limit", "2",
                             "--budget", "450", "--batch-size", "2", "--max-new-tokens", "6")  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    summary = json.loads(out)
    assert len(rows) == 2 and summary["n"] == 2 and 0 <= summary["exact_match"] <= 1
    assert all(r["context_tokens"] <= 450 and isinstance(r["prediction"], str) for r in rows)
    assert set(summary["by_sex"]) <= {"female", "male"} and "by_kind" in summary


def test_killed_synth_leaves_nothing_that_looks_complete(tmp_path, run_cli):
    """SIGKILL `ehr synth` mid-run: every bundle on disk is whole JSON, no qa.jsonl or truth.jsonl is there
    (they would look like a finished, smaller set), and a rerun into the same folder writes the whole set."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, patients = tmp_path / "synth", 30
    command = [sys.executable, "-m", "medgem.cli", "ehr", "synth", "--patients", str(patients), "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "MEDGEM_QUIET": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "bundles").is_dir() or len(os.listdir(out / "bundles")) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "synth ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "synth finished before it could be killed"
    assert not (out / "qa.jsonl").exists() and not (out / "truth.jsonl").exists()
    kept = sorted((out / "bundles").glob("*.json"))
    assert 3 <= len(kept) < patients
    for bundle in kept:
        assert json.loads(bundle.read_text())["resourceType"] == "Bundle"

    code, stdout, err = run_cli(*command[3:])  # the rerun, in-process
    assert code == 0, err
    truth = [json.loads(line) for line in (out / "truth.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert len(truth) == patients and {i["bundle"] for i in items} == {t["bundle"] for t in truth}
    assert sorted(p.name for p in (out / "bundles").iterdir()) == sorted(t["bundle"][8:] for t in truth)
    assert json.loads(stdout.splitlines()[0])["questions"] == len(items)
