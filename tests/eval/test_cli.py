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
    # a shorter run: the unpaired difference (each run on its own items) is labelled apart from the paired one
    evaluate(task, scripted(lambda p: "B"), tmp_path / "c", RunConfig(model_name="short", n_boot=100, progress=False,
                                                                      limit=10))
    capsys.readouterr()
    assert medgem.cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    n = len(task.items)
    assert "unpaired 2 - 1" in out and "paired 2 - 1, same items" in out and "10 items in common" in out
    assert f"({n} vs 10 items)" in out and "(10 items)" in out


def test_terminal_summary_has_subgroups_and_binned_bands(tmp_path, scripted):
    from medgem.eval.report import text_summary

    task = load_task("medqa", "handwritten")
    for i, item in enumerate(task.items):
        item.meta["age"] = str(20 + i)  # 60 distinct ages
    results = evaluate(task, scripted(lambda p: "A"), tmp_path / "r",
                       RunConfig(n_boot=50, progress=False, subgroups=["topic", "age:20", "age"]))
    lines = text_summary(results)
    assert "by topic:" in lines and any(line.startswith("  cardiology  n=") for line in lines)
    assert "by age, binned into bands of width 20:" in lines
    assert [line.split("  n=")[0].strip() for line in lines if line.startswith("  [") and "width" not in line][:3] \
        == ["[20, 40)", "[40, 60)", "[60, 80)"]
    assert "by age, binned into automatic quantiles: 4 groups of about equal size:" in lines
    assert sum("largest gap accuracy" in line for line in lines) == 3
    report = (tmp_path / "r" / "report.html").read_text()
    assert "Binned into bands of width 20." in report and "Binned into automatic quantiles" in report


def test_killed_eval_resumes_to_the_same_predictions(tmp_path):
    """kill -9 in the middle of `medgem eval` on the real embedded model: the rerun finishes only what is
    missing, and every saved prediction is whole and equal to an uninterrupted run's."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [sys.executable, "-m", "medgem.cli", "eval", "medqa", "--data", "handwritten", "--out", str(out),
                "--limit", "6", "--batch-size", "1", "--max-new-tokens", "8", "--quiet"]

    env = dict(os.environ, MEDGEM_QUIET="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if predictions.exists() and len(predictions.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = predictions.read_text().splitlines()
    assert 2 <= len(saved) < 6 and not (killed / "results.json").exists()

    for out in (killed, tmp_path / "fresh"):
        done = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-500:]

    def whole_rows(out):
        """The whole JSON lines (a line torn by the kill may stay behind; the runner skips it)."""
        rows = []
        for line in (out / "predictions.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    resumed, fresh = whole_rows(killed), whole_rows(tmp_path / "fresh")
    assert len(resumed) == 6 and len({r["id"] for r in resumed}) == 6  # nothing computed twice
    assert {r["id"]: r["raw"] for r in resumed} == {r["id"]: r["raw"] for r in fresh}


def test_records_agent_through_medgem_eval(tmp_path):
    """`medgem eval ehrqa --method agent` end to end on the embedded model and `ehr synth` records: results
    with a bootstrap CI, one prediction and one tool transcript per question."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MEDGEM_QUIET="1")
    run = [sys.executable, "-m", "medgem.cli"]
    synth = subprocess.run([*run, "ehr", "synth", "--out", str(tmp_path / "ehr"), "--patients", "2", "--seed", "3"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert synth.returncode == 0, synth.stderr[-500:]
    out = tmp_path / "agent"
    done = subprocess.run([*run, "eval", "ehrqa", "--data", str(tmp_path / "ehr" / "qa.jsonl"), "--method", "agent",
                           "--limit", "2", "--agent-steps", "2", "--max-new-tokens", "24", "--n-boot", "50",
                           "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-500:]
    results = json.loads((out / "results.json").read_text())
    assert "not a medical device" in done.stderr + done.stdout
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2
    transcripts = sorted((out / "transcripts").glob("*.json"))
    assert len(transcripts) == 2 and all(json.loads(t.read_text())["id"] for t in transcripts)
    accuracy = results["metrics"]["accuracy"]
    assert results["method"] == "agent" and accuracy["n"] == 2
    assert 0 <= accuracy["low"] <= accuracy["value"] <= accuracy["high"] <= 1  # the bootstrap interval
