"""`medgem generate` / `medgem chat` as a user runs them: real processes, real weights, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medgem.notice import NOTICE


def medgem(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "medgem.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one error line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medgem: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]


def test_generate_json_reports_text_ids_and_speed():
    proc = medgem("generate", "--raw", "Hypertension is defined as", "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["completion_tokens"] == len(out["token_ids"]) > 0 and out["prompt_tokens"] >= 5
    assert out["text"].strip() and out["decode_tok_per_s"] > 0 and out["finish_reason"] in ("stop", "length")
    assert NOTICE in proc.stderr


def test_generate_streams_and_prints_speed():
    proc = medgem("generate", "--raw", "The kidneys", "--max-new-tokens", "8", "--quant", "none", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tok/s]" in proc.stderr


def test_chat_repl_keeps_history():
    proc = medgem("chat", "--max-new-tokens", "8", stdin="What is asthma?\nAnd its treatment?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(NOTICE) == 1
    assert proc.stderr.count("tok/s]") == 2  # two answers


def test_chat_one_shot():
    proc = medgem("chat", "Define sepsis.", "--max-new-tokens", "8", "--system", "Be brief.")
    assert proc.returncode == 0 and proc.stdout.strip()
    # the embedded model is a base model: one note, with the completion-mode fix, before the answer
    notes = [line for line in proc.stderr.splitlines() if line.startswith("medgem: note:")]
    assert len(notes) == 1 and "is a base model" in notes[0] and "generate --raw" in notes[0]


@pytest.mark.parametrize("name, metadata, base", [
    ("gemma-3-270m-q4_k_m.gguf", {}, True),  # the embedded file: llama.cpp writes no fine-tune for a base model
    ("gemma-3-4b-it-q4_k_m.gguf", {}, False),
    ("model.gguf", {"general.finetune": "it"}, False),
    ("medgemma-4b-it", None, False),
    ("gemma-3-4b-pt", None, True),
    ("my-finetune", None, False),  # unknown folders are not second-guessed
])
def test_base_models_are_told_from_what_they_say(name, metadata, base):
    from pathlib import Path

    from medgem.pipeline import is_base_model

    info = {"format": "gguf", "metadata": metadata} if metadata is not None else {"format": "hf"}
    assert is_base_model(Path(name), info) is base


@pytest.mark.parametrize(
    "args, needles",
    [
        (["generate", ""], ["prompt is empty"]),
        (["generate", "hi", "--max-new-tokens", "-3"], ["max_new_tokens"]),
        (["generate", "hi", "--temperature", "-1"], ["temperature"]),
        (["generate", "hi", "--model", "/no/such/model"], ["model not found", "/no/such/model"]),
        (["chat", "  "], ["question is empty"]),
        (["generate", "hi", "--regex", "(unclosed"], ["regex is invalid"]),
        (["generate", "hi", "--json-schema", "/no/such/schema.json"], ["/no/such/schema.json: no such file"]),
        (["generate", "hi", "--choice", " , "], ["choice needs"]),
    ],
)
def test_bad_arguments(args, needles):
    assert_clean_error(medgem(*args), *needles)


def test_generate_constrained_to_a_json_schema(tmp_path):
    schema = {"type": "object", "properties": {"finding": {"enum": ["opacity", "normal"]},
                                               "size_mm": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["finding", "size_mm"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    proc = medgem("generate", "--raw", "Chest CT: 6 mm nodule. As JSON:", "--json-schema", str(tmp_path / "schema.json"),
                  "--max-new-tokens", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(json.loads(proc.stdout)["text"])
    assert set(out) == {"finding", "size_mm"} and out["finding"] in ("opacity", "normal") and 1 <= out["size_mm"] <= 99


def test_prompt_over_context():
    prompt = "sepsis " * 33_000
    assert_clean_error(medgem("generate", "--raw", "-", "--max-new-tokens", "4", stdin=prompt), "context is 32768")


def test_truncated_gguf(embedded_gguf, tmp_path):
    cut = tmp_path / "half.gguf"
    with open(embedded_gguf, "rb") as f:
        cut.write_bytes(f.read(40_000_000))
    assert_clean_error(medgem("generate", "hi", "--model", str(cut)), "half.gguf")


def test_config_weights_mismatch(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path / "ckpt"
    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(medgem("generate", "hi", "--model", str(folder)), "mlp.gate_proj.weight", "config expects")


def test_image_on_text_only_model():
    from pydicom.data import get_testdata_file

    proc = medgem("chat", "--image", get_testdata_file("RG1_UNCR.dcm"), "Describe this X-ray", "--max-new-tokens", "4")
    assert_clean_error(proc, "no vision tower")


def test_chat_with_dicom_on_a_multimodal_checkpoint(tiny_medgemma):
    """The seed's quick-start shape: a system role, a chest X-ray DICOM and a question, end to end."""
    from pydicom.data import get_testdata_file

    proc = medgem("chat", "--model", str(tiny_medgemma), "--image", get_testdata_file("RG1_UNCR.dcm"),
                  "--window", "auto", "--system", "You are an expert radiologist.", "Describe this X-ray",
                  "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # 4 soft tokens for the image plus the markers and text, all counted in the prompt.
    assert out["prompt_tokens"] > 10 and out["completion_tokens"] >= 1
    assert "Traceback" not in proc.stderr and NOTICE in proc.stderr


def test_draft_flag_keeps_greedy_text():
    """--draft embedded: the 270M drafts for the (here: same, int8) model; the JSON answer is unchanged."""
    args = ["generate", "--raw", "Chronic kidney disease is staged by", "--max-new-tokens", "16", "--temperature", "0",
            "--json"]
    plain, drafted = medgem(*args), medgem(*args, "--draft", "embedded", "--draft-tokens", "3")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert json.loads(drafted.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert_clean_error(medgem("generate", "hi", "--draft", "embedded", "--draft-tokens", "0"), "at least 1 token")


def test_draft_lookup_keeps_greedy_text():
    """--draft lookup: tokens copied from earlier in the text, checked by the model (fp32, so the check
    of several tokens at once rounds exactly as one at a time); the answer is unchanged."""
    args = ["generate", "--raw", "Findings: small left pleural effusion. Impression: small left", "--dtype",
            "float32", "--max-new-tokens", "16", "--temperature", "0", "--json"]
    plain, looked = medgem(*args), medgem(*args, "--draft", "lookup")
    assert plain.returncode == 0 and looked.returncode == 0, looked.stderr
    assert json.loads(looked.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert_clean_error(medgem("generate", "hi", "--draft", "lookup", "--draft-tokens", "0"), "k >= 1")
