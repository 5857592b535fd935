"""`medgem eval` through the real entry point (only the eval subcommand registered, so this area's
tests do not depend on other subcommands being importable)."""

import json

import pytest

import medgem.cli
from medgem.eval.runner import RunConfig, evaluate
from medgem.eval.tasks import load_task


@pytest.fixture(autouse=True)
def only_eval(monkeypatch):
    monkeypatch.setattr(medgem.cli, "SUBCOMMANDS", ["eval"])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        medgem.cli.main(["eval", "medqa", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--data", "--out", "--method", "--limit", "--seed", "--subgroups", "--model"))
    assert medgem.cli.main(["eval"]) == 2  # no task: the eval help, and a usage exit code


def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    code = medgem.cli.main(["eval", "medqa", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"medgem: error: data file not found: {tmp_path / 'missing.jsonl'}"
    assert "not a medical device" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert medgem.cli.main(["eval", "medqa", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: missing field 'options'" in capsys.readouterr().err
    # Bad settings fail before a model is loaded (this would otherwise take seconds, not milliseconds).
    assert medgem.cli.main(["eval", "medqa", "--data", "handwritten", "--out", "o", "--batch-size", "0"]) == 2
    assert medgem.cli.main(["eval", "vqa", "--data", "handwritten", "--out", "o"]) == 2
    assert medgem.cli.main(["eval", "medqa", "--data", "handwritten", "--out", "o", "--subgroups", "sex"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be at least 1" in err and "subgroup column 'sex' is in no item" in err


def test_compare_prints_a_table(tmp_path, capsys, scripted):
    task = load_task("medqa", "handwritten")
    evaluate(task, scripted(lambda p: "A"), tmp_path / "a", RunConfig(model_name="base", n_boot=100, progress=False))
    evaluate(task, scripted(lambda p: "B"), tmp_path / "b", RunConfig(model_name="tuned", n_boot=100, progress=False))
    assert medgem.cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "+0.000" in out and "base (generate)" in out and "tuned (generate)" in out
    assert medgem.cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_common"] == len(task.items) and data["metrics"][0]["diff"] == 0.0
    assert medgem.cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
