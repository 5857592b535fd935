"""Subgroup report on the synthetic EHR-QA set, rendered in headless Chromium; and `compare`."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from medgem.eval.compare import compare_runs, format_table
from medgem.eval.runner import RunConfig, evaluate
from medgem.eval.tasks import load_task
from medgem.notice import NOTICE

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def ehr_set(tmp_path_factory):
    from medgem.ehr import synth

    folder = tmp_path_factory.mktemp("ehr")
    synth.write(folder, patients=40, seed=3)
    truth = [json.loads(line) for line in (folder / "truth.jsonl").read_text().splitlines()]
    born = {t["patient_id"]: t["birth_date"] for t in truth}
    assert len(set(born.values())) == len(born)  # the scripted model tells patients apart by birth date
    qa = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines()]
    gold = {(born[q["patient_id"]], q["question"]): q for q in qa}
    return folder / "qa.jsonl", gold


def _biased_model(scripted, ask, gold, male_wrong_every: int):
    """Always right for women; for men, wrong on every `male_wrong_every`-th question asked."""
    seen = {"male": 0}

    def reply(prompt):
        q = gold[re.search(r"born (\d{4}-\d\d-\d\d)", prompt).group(1), ask(prompt)]
        if q["sex"] == "male":
            seen["male"] += 1
            if seen["male"] % male_wrong_every == 0:
                return " I cannot tell"
        return f" {q['answer']}"

    return scripted(reply)


def test_ehrqa_subgroups_flag_the_biased_model(ehr_set, tmp_path, scripted, ask):
    path, gold = ehr_set
    task = load_task("ehrqa", path)
    model = _biased_model(scripted, ask, gold, male_wrong_every=2)
    res = evaluate(task, model, tmp_path, RunConfig(subgroups=["sex", "age_band"], n_boot=500, progress=False,
                                                    batch_size=16))
    assert all(k["stop"] == ["\n"] and k["max_new_tokens"] == 16 for k in model.kwargs)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    male = [r["correct"] for r in rows if r["meta"]["sex"] == "male"]
    by_sex = {e["column"]: e for e in res["subgroups"]}["sex"]
    assert by_sex["groups"]["female"]["accuracy"]["value"] == 1.0
    assert by_sex["groups"]["male"]["accuracy"]["value"] == pytest.approx(np.mean(male))
    assert 0.45 < np.mean(male) < 0.55
    gap = by_sex["gaps"]["accuracy"]
    assert (gap["high_group"], gap["low_group"], gap["flag"]) == ("female", "male", True)
    by_age = {e["column"]: e for e in res["subgroups"]}["age_band"]
    for band, entry in by_age["groups"].items():
        expected = np.mean([r["correct"] for r in rows if r["meta"]["age_band"] == band])
        assert entry["accuracy"]["value"] == pytest.approx(expected) and entry["accuracy"]["n"] == entry["n"]

    html = (tmp_path / "report.html").read_text()
    assert NOTICE in html and "CI excludes 0" in html and "subgroup_sex.png" in html
    assert "born" not in html and gold[next(iter(gold))]["question"] not in html  # no record or question text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(ehr_set, tmp_path, scripted, ask):
    path, gold = ehr_set
    out = tmp_path / "run"
    evaluate(load_task("ehrqa", path), _biased_model(scripted, ask, gold, 2), out,
             RunConfig(subgroups=["sex", "age_band"], n_boot=200, progress=False, batch_size=32))
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1100,2200",
           f"--screenshot={shot}", (out / "report.html").as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=90)
    dom = subprocess.run([*cmd[:-2], "--dump-dom", (out / "report.html").as_uri()], check=True,
                         capture_output=True, timeout=90, text=True).stdout
    assert NOTICE in dom and "By sex" in dom
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2200, 1100)
    # The plots drew: the subgroup bars' green and the notice's yellow are on the page.
    green = ((abs(image - [0x55, 0xA8, 0x68]).sum(-1)) < 30).sum()
    yellow = ((abs(image - [0xFF, 0xF3, 0xCD]).sum(-1)) < 12).sum()
    assert green > 2000 and yellow > 2000
    print(f"screenshot: {shot}")


def test_compare_base_vs_better(ehr_set, tmp_path, scripted, ask):
    path, gold = ehr_set
    task = load_task("ehrqa", path)
    cfg = RunConfig(n_boot=300, progress=False, batch_size=32)
    base = evaluate(task, _biased_model(scripted, ask, gold, 2), tmp_path / "base",
                    RunConfig(**{**cfg.__dict__, "model_name": "base"}))
    tuned = evaluate(task, _biased_model(scripted, ask, gold, 10), tmp_path / "tuned",
                     RunConfig(**{**cfg.__dict__, "model_name": "tuned"}))
    cmp = compare_runs(tmp_path / "base", tmp_path / "tuned", n_boot=300)
    acc = next(m for m in cmp["metrics"] if m["metric"] == "accuracy")
    diff = tuned["metrics"]["accuracy"]["value"] - base["metrics"]["accuracy"]["value"]
    assert acc["diff"] == pytest.approx(diff) and acc["paired"]["value"] == pytest.approx(diff)
    assert 0 < acc["paired"]["low"] < diff < acc["paired"]["high"]
    table = format_table(cmp)
    assert "accuracy" in table and "base" in table and "tuned" in table and f"{diff:+.3f}" in table
