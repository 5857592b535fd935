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
