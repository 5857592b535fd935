"""Issue 21: every data file read whole (eval and SFT JSON/JSONL/CSV, SigLIP pairs, probe files, JSON
schemas) is refused past the size limit and past the nesting depth before it is parsed, with one line
naming the file and exit 2, and before any model loads (so each case takes milliseconds)."""

from __future__ import annotations

import json

import pytest

from .conftest import one_error

MCQ = {"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}
DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture
def files(tmp_path, monkeypatch):
    """1.5 MiB files of each format under a 1 MiB limit, and files nested 5,000 deep."""
    monkeypatch.setenv("MEDGEM_MAX_DATA_MB", "1")
    monkeypatch.chdir(tmp_path)
    line = json.dumps(MCQ) + "\n"
    (tmp_path / "big.jsonl").write_text(line * (3 * 2**19 // len(line)))
    (tmp_path / "big.json").write_text(json.dumps([MCQ] * (3 * 2**19 // len(line))))
    (tmp_path / "big.csv").write_text("path,label\n" + "a.png,x\n" * (3 * 2**19 // 8))
    (tmp_path / "deep.jsonl").write_text(DEEP + "\n")
    (tmp_path / "deep.json").write_text(DEEP)
    (tmp_path / "deep-record.jsonl").write_text(json.dumps({"messages": json.loads("[" * 60 + "]" * 60)})[:-1]
                                                + ', "x": ' + DEEP + "}\n")
    return tmp_path


BIG = [
    ["eval", "medqa", "--data", "big.jsonl", "--out", "o"],
    ["eval", "pubmedqa", "--data", "big.json", "--out", "o"],
    ["eval", "vqa", "--data", "big.json", "--out", "o"],
    ["eval", "classify", "--data", "big.csv", "--out", "o"],
    ["finetune", "sft", "big.jsonl", "--out", "o"],
    ["finetune", "sft", "train.jsonl", "--eval-data", "big.jsonl", "--out", "o"],
    ["finetune", "siglip", "big.jsonl", "--model", "m", "--out", "o"],
    ["finetune", "classify", "big.csv", "--model", "m", "--out", "o"],
    ["probe", "predict", "big.json", "x.png"],
    ["generate", "hi", "--json-schema", "big.json"],
]
DEEPER = [
    (["eval", "medqa", "--data", "deep.jsonl", "--out", "o"], "deep.jsonl:1: JSON nested deeper than 64"),
    (["eval", "vqa", "--data", "deep.json", "--out", "o"], "deep.json: JSON nested deeper than 64"),
    (["eval", "pubmedqa", "--data", "deep.json", "--out", "o"], "deep.json: JSON nested deeper than 64"),
    (["finetune", "sft", "deep.jsonl", "--out", "o"], "deep.jsonl line 1: JSON nested deeper than 64"),
    (["finetune", "sft", "deep-record.jsonl", "--out", "o"], "deep-record.jsonl line 1: JSON nested deeper"),
    (["finetune", "siglip", "deep.jsonl", "--model", "m", "--out", "o"], "deep.jsonl line 1: JSON nested deeper"),
    (["probe", "predict", "deep.json", "x.png"], "deep.json: JSON nested deeper than 64"),
    (["generate", "hi", "--json-schema", "deep.json"], "--json-schema deep.json: JSON nested deeper than 64"),
]


@pytest.mark.parametrize("argv", BIG, ids=[" ".join(a[:3]) for a in BIG])
def test_a_file_over_the_size_limit_is_refused_before_reading(cli, files, argv):
    if "train.jsonl" in argv:
        (files / "train.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    name = next(a for a in argv if a.startswith("big."))
    line = one_error(*cli(*argv)[::2])
    assert f"{name}: 1.5 MiB, over the 1 MiB limit for a data file (MEDGEM_MAX_DATA_MB raises it)" in line


@pytest.mark.parametrize("argv, said", DEEPER, ids=[" ".join(a[:3]) for a, _ in DEEPER])
def test_deep_json_is_refused_before_parsing(cli, files, argv, said):
    assert said in one_error(*cli(*argv)[::2])


def test_a_bad_limit_setting_is_one_line(cli, files, monkeypatch):
    monkeypatch.setenv("MEDGEM_MAX_DATA_MB", "lots")
    assert "MEDGEM_MAX_DATA_MB must be a positive number" in one_error(*cli("eval", "medqa", "--data", "big.jsonl",
                                                                              "--out", "o")[::2])
