"""The CLI's one error path (issue 22): every error a user can cause is one line on stderr, exit 2, naming
the input (a missing file by its full path) and the fix, with a close match for a mistyped command or flag.

Run in-process through the real entry point: argparse, the model flags and the file checks all fail before
any model loads, so these take milliseconds.
"""

from __future__ import annotations

import os

import pytest
import torch

from .conftest import one_error


@pytest.mark.parametrize("args, needles", [
    (["generate", "--max-tokens", "5", "hi"], ["unknown option --max-tokens", "did you mean --max-new-tokens?"]),
    (["chat", "--temprature", "0.7", "hi"], ["did you mean --temperature?"]),
    (["genrate", "hi"], ["invalid choice 'genrate'", "did you mean generate?"]),
    (["dicom", "infoo", "x.dcm"], ["did you mean info?"]),
    (["eval", "medqa", "--data", "handwritten", "--out", "o", "--treshold", "0.3"], ["unknown option --treshold"]),
    (["serve", "--port", "eighty"], ["--port", "invalid int value"]),
    (["generate"], ["the following arguments are required: prompt", "see medgem generate --help"]),
])
def test_mistyped_commands_and_flags_get_one_line_and_a_close_match(cli, args, needles):
    line = one_error(*cli(*args)[::2])
    for needle in needles:
        assert needle in line


def test_a_flag_that_would_do_nothing_is_refused(cli):
    line = one_error(*cli("chat", "--window", "lung", "hi")[::2])
    assert "--window applies to --image" in line and "add --image FILE or drop --window" in line
    assert "--slices" in one_error(*cli("chat", "--slices", "4", "hi")[::2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["generate", "hi"], ["bench"], ["serve"]])
def test_cuda_without_cuda_names_the_fix(cli, command):
    line = one_error(*cli(*command, "--device", "cuda")[::2])
    assert "device 'cuda'" in line and "use --device cpu" in line and "internal error" not in line
    assert "unknown device 'gpu0'" in one_error(*cli("generate", "hi", "--device", "gpu0")[::2])


def test_missing_files_are_named_by_their_full_path(cli, tmp_path, monkeypatch):
    assert "/nope/missing.dcm: no such file" in one_error(*cli("dicom", "info", "/nope/missing.dcm")[::2])
    monkeypatch.chdir(tmp_path)  # a relative path shows where medgem looked
    line = one_error(*cli("ehr", "ask", "--qa", "qa.jsonl", "--out", "p.jsonl")[::2])
    assert f"{tmp_path}/qa.jsonl: no such file" in line
    line = one_error(*cli("dicom", "preview", "series/", "-o", "sheet.png")[::2])
    assert f"{tmp_path}/series: no such" in line


def test_os_errors_a_user_causes_are_one_line_with_the_path(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_error(*cli("ehr", "synth", "--patients", "1", "--out", blocker / "synth")[::2])
    assert str(blocker) in line and "not a folder" in line and "internal error" not in line


def test_help_shows_defaults_and_only_the_tasks_own_options(cli):
    code, out, _ = cli("generate", "--help")
    assert code == 0 and "most tokens to generate (default: 256)" in out
    code, out, _ = cli("serve", "--help")
    assert "port to listen on (default: 8000)" in " ".join(out.split()) or os.environ.get("MEDGEM_PORT")
    assert "--default-temperature" in out
    code, out, _ = cli("ehr", "synth", "--help")
    assert "(default: 50)" in out
    code, out, _ = cli("eval", "medqa", "--help")
    assert "--method" in out and "(default: generate)" in " ".join(out.split())
    assert "--threshold" not in out and "--budget" not in out
    code, out, _ = cli("eval", "classify", "--help")
    assert "--threshold" in out and "--budget" not in out
    code, out, _ = cli("eval", "ehrqa", "--help")
    assert "--budget" in out and "agent" in out  # ehrqa: its own --method (ask or agent)
    code, out, _ = cli("chat", "--help")
    for preset in ("lung", "mediastinum", "bone", "brain", "abdomen", "minmax", "CENTER/WIDTH"):
        assert preset in out
