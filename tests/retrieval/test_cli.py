"""The SigLIP subcommands end to end, in-process through medgem.cli.main: classify, embed, probe,
index, search (with the HTML contact sheet) and their user errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import medgem.cli
from medgem.notice import NOTICE


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = medgem.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_json_and_table(capsys, trained_siglip, make_patterns, tmp_path):
    images = make_patterns(tmp_path, 6, seed=7)
    code, out, err = run(capsys, "classify", "--model", trained_siglip, "--labels", "horizontal stripes,vertical stripes,checkerboard",
                         "--template", "a {}", "--json", *[p for p, _, _ in images])
    assert code == 0 and NOTICE in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p, _, _ in images]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    assert sum(r["top"] == pattern for r, (_, pattern, _) in zip(rows, images)) >= 4
    code, out, _ = run(capsys, "classify", "--model", trained_siglip, "--labels", "red,blue", images[0][0])
    assert code == 0 and out.splitlines()[0] == str(images[0][0]) and "%" in out


def test_embed_writes_unit_vectors(capsys, trained_siglip, medical_images, tmp_path):
    out_file = tmp_path / "v.npy"
    code, out, _ = run(capsys, "embed", "--model", trained_siglip, medical_images / "CT_small.dcm", "--text", "a ct scan",
                       "-o", out_file)
    vectors = np.load(out_file)
    assert code == 0 and vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_probe_train_predict_and_curve(capsys, trained_siglip, make_patterns, tmp_path):
    images = make_patterns(tmp_path / "imgs", 48, seed=11)
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((p.relative_to(tmp_path), pattern) for p, pattern, _ in images)
    probe_file = tmp_path / "probe.json"
    code, out, _ = run(capsys, "probe", "train", data, "--model", trained_siglip, "-o", probe_file)
    assert code == 0 and "3 classes" in out and json.loads(probe_file.read_text())["kind"] == "medgem-linear-probe"

    held_out = make_patterns(tmp_path / "new", 9, seed=12)
    code, out, _ = run(capsys, "probe", "predict", probe_file, *[p for p, _, _ in held_out], "--model", trained_siglip,
                       "--json")
    predictions = [json.loads(line)["label"] for line in out.splitlines()]
    assert code == 0 and sum(p == truth for p, (_, truth, _) in zip(predictions, held_out)) >= 7

    curve_file = tmp_path / "curve.json"
    code, out, _ = run(capsys, "probe", "curve", data, "--model", trained_siglip, "-o", curve_file, "--repeats", "3")
    curve = json.loads(curve_file.read_text())
    assert code == 0 and [p["n_per_class"] for p in curve["points"]] == [1, 2, 4, 8]
    assert curve["points"][-1]["auc_mean"] > 0.9 and curve_file.with_suffix(".png").stat().st_size > 1000

    code, _, err = run(capsys, "probe", "predict", probe_file, held_out[0][0], "--model", tmp_path / "missing")
    assert code == 2 and "not found" in err


def test_index_and_search_cli(capsys, retrieval_siglip, medical_images, tmp_path):
    index = tmp_path / "idx"
    code, out, err = run(capsys, "index", "build", medical_images, "--out", index, "--model", retrieval_siglip)
    assert code == 0 and "10 added, 0 unchanged, 0 unreadable; 10 images" in out and NOTICE in err
    sheet = tmp_path / "sheet.html"
    code, out, _ = run(capsys, "search", index, "--image", medical_images / "retina.png", "--model", retrieval_siglip,
                       "-k", "3", "--json", "--html", sheet)
    hits = [json.loads(line) for line in out.splitlines()[:3]]
    assert code == 0 and Path(hits[0]["path"]).name == "retina.png" and hits[0]["score"] > 0.999
    page = sheet.read_text()
    assert page.count("data:image/png;base64,") == 3 and NOTICE in page
    code, out, _ = run(capsys, "search", index, "a chest x-ray", "--model", retrieval_siglip)
    assert code == 0 and len(out.splitlines()) == 10

    code, out, _ = run(capsys, "index", "remove", index, medical_images / "cell.png")
    assert code == 0 and out.startswith("1 removed; 9 images left")
    code, out, _ = run(capsys, "index", "info", index)
    assert code == 0 and json.loads(out)["items"] == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["classify", "--labels", "a,b", "x.png"], "no SigLIP model"),
        (["search", "{index}", "--model", "{model}"], "either a text query or --image"),
        (["search", "{tmp}", "text", "--model", "{model}"], "not an index"),
        (["index", "build", "{tmp}/nowhere", "--out", "{tmp}/i", "--model", "{model}"], "no such file or folder"),
        (["index", "build", "{tmp}", "--out", "{tmp}/i", "--model", "{model}", "--store", "redis://x"], "unknown vector store"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, retrieval_siglip, monkeypatch, argv, message):
    monkeypatch.delenv("MEDGEM_SIGLIP_MODEL", raising=False)
    (tmp_path / "a.png").write_bytes(b"")
    filled = [a.format(tmp=tmp_path, model=retrieval_siglip, index=tmp_path) for a in argv]
    code, _, err = run(capsys, *filled)
    assert code == 2 and message in err and "Traceback" not in err


def test_finetune_siglip_trains_saves_and_resumes(capsys, untrained_siglip, patterns_data, tmp_path):
    out = tmp_path / "run"
    common = ["finetune", "siglip", patterns_data / "train.csv", "--model", untrained_siglip, "--out", out,
              "--batch-size", 8, "--lr", 1e-3, "--warmup-steps", 1, "--save-every", 2, "--no-progress"]
    code, stdout, err = run(capsys, *common, "--steps", 4)
    assert code == 0 and NOTICE in err
    summary = json.loads(stdout)
    assert summary["steps"] == 4 and Path(summary["final"]) == out / "final" and np.isfinite(summary["loss"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    # the result is a model the other commands load: classify with it
    image = next(patterns_data.glob("*.png"))
    code, stdout, _ = run(capsys, "classify", "--model", out / "final", "--labels", "stripes,checks", "--json", image)
    assert code == 0 and json.loads(stdout)["image"] == str(image)
    # a second run into the same folder must not silently start over ...
    code, _, err = run(capsys, *common, "--steps", 6)
    assert code == 2 and "already holds checkpoints; pass --resume" in err
    # ... and --resume continues from checkpoint-2's step count
    code, stdout, _ = run(capsys, *common, "--steps", 6, "--resume")
    assert code == 0 and json.loads(stdout)["steps"] == 6
    code, _, err = run(capsys, *common, "--steps", 6, "--batch-size", 1, "--resume")
    assert code == 2 and "--batch-size >= 2" in err
