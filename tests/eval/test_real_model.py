"""The harness on the real embedded Gemma 3 270M (a general base model: near-chance scores are expected)."""

import json

import pytest

from medgem.eval.runner import RunConfig, evaluate
from medgem.eval.tasks import load_task

pytestmark = pytest.mark.slow


def test_handwritten_mcq_both_ways(real_pipe, tmp_path):
    pipe = real_pipe  # the session-wide embedded model (tests/conftest.py)
    task = load_task("medqa", "handwritten")
    gen = evaluate(task, pipe, tmp_path / "gen", RunConfig(limit=2, n_boot=100, progress=False, batch_size=2))
    rows = [json.loads(line) for line in (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["output"], str) for r in rows)
    assert 0 <= gen["metrics"]["accuracy"]["value"] <= 1

    ll = evaluate(task, pipe, tmp_path / "ll", RunConfig(method="loglik", limit=1, n_boot=100, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "ll" / "predictions.jsonl").read_text().splitlines()]
    first = rows[0]["raw"]
    assert set(first["logprob"]) == {"A", "B", "C", "D"} and all(v < 0 for v in first["logprob"].values())
    assert all(n >= 1 for n in first["ntokens"].values())
    assert 0 <= ll["metrics"]["accuracy"]["value"] <= 1
    # Deterministic: scoring the same item again gives the same numbers.
    item = task.items[0]
    again = evaluate(task, pipe, tmp_path / "ll2", RunConfig(method="loglik", limit=1, n_boot=10, progress=False))
    assert again["metrics"]["accuracy"]["value"] == float(rows[0]["correct"]) and item.id == rows[0]["id"]
    second = json.loads((tmp_path / "ll2" / "predictions.jsonl").read_text().splitlines()[0])["raw"]
    assert second == first


def test_image_tasks_through_a_multimodal_pipeline(tiny_medgemma, tmp_path, images):
    """VQA, classification and report generation reach a real (tiny, random) multimodal pipeline with
    PNG and DICOM images; scores are meaningless, the plumbing is what is checked."""
    import shutil

    from pydicom.data import get_testdata_file

    import medgem
    from medgem.errors import CapabilityError

    pipe = medgem.load(tiny_medgemma, dtype="float32")
    shutil.copy(images["retina"], tmp_path / "retina.png")
    shutil.copy(images["ihc"], tmp_path / "ihc.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "vqa.json").write_text(json.dumps([
        {"qid": 1, "img_name": "retina.png", "question": "Is this a fundus photo?", "answer": "yes",
         "answer_type": "CLOSED"},
        {"qid": 2, "img_name": "ct.dcm", "question": "What modality?", "answer": "CT", "answer_type": "OPEN"}]))
    (tmp_path / "cls.csv").write_text("path,label\nretina.png,fundus\nihc.png,pathology\nct.dcm,ct\n")
    (tmp_path / "rep.jsonl").write_text(json.dumps({"image": "ct.dcm", "report": "Normal CT."}) + "\n")
    cfg = RunConfig(n_boot=20, progress=False, max_new_tokens=3)
    for name, data in (("vqa", "vqa.json"), ("classify", "cls.csv"), ("report", "rep.jsonl")):
        res = evaluate(load_task(name, tmp_path / data), pipe, tmp_path / name, cfg)
        rows = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        assert res["computed_now"] == len(rows) == res["n_items"]
    with pytest.raises(CapabilityError, match="score\\(\\) takes messages"):  # text-only score() today
        evaluate(load_task("classify", tmp_path / "cls.csv"), pipe, tmp_path / "ll",
                 RunConfig(method="loglik", progress=False))
