"""Every README command block marked `<!-- readme-test: offline -->` runs as written (issue 22).

A marked block holds `medgem ...` lines only, each run in-process through the real entry point (the
`medgem` console script is `medgem.cli:main`) in one scratch folder, in order, so later lines use what
earlier ones wrote (`ehr synth` then `ehr ask`). The scratch folder holds the files the README names
(RG1_UNCR.dcm from pydicom-data, a small CT series); MEDGEM_HOME is the suite's own, so the embedded
model is assembled once. In-process saves the interpreter start of every line; each model command still
loads the model, as a user's does. Measured 2026-12-03 on the shared 2-core VM under load (average 5):
133 s in all, the eval block 61 s, the EHR block 43 s, the generate block 27 s. That is over the 60 s
aimed at; the eval block is the one to trim first.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- readme-test: offline -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def offline_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each fenced block right after the marker (blank lines between allowed)."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].strip() == MARK:
            blocks.append((text[: match.start()].count("\n") + 1, match.group(2)))
    return blocks


def commands(body: str) -> list[list[str]]:
    """The command lines of a block, as argv lists (comments dropped, as the shell drops them)."""
    out = []
    for line in body.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The folder the README's commands run in, with the input files they name."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("readme")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), folder / "RG1_UNCR.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    series = folder / "ct_series"
    series.mkdir()
    for z in range(4):  # CT_small as four slices of one series, 5 mm apart
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(z) * 5]
        ds.InstanceNumber, ds.SOPInstanceUID = z + 1, generate_uid()
        ds.save_as(series / f"{z + 1}.dcm")
    return folder


def test_the_readme_marks_its_offline_blocks():
    blocks = offline_blocks(README.read_text())
    assert len(blocks) >= 3, "the README lost its offline command blocks"
    for line, body in blocks:
        for argv in commands(body):
            assert argv[0] == "medgem", f"README line {line}: an offline block runs medgem commands only"


@pytest.mark.slow
@pytest.mark.parametrize("line, body", [pytest.param(line, body, id=f"README-line-{line}")
                                        for line, body in offline_blocks(README.read_text())])
def test_readme_block_runs(line, body, scratch, monkeypatch, capsys):
    from medgem.cli import main

    monkeypatch.chdir(scratch)
    for argv in commands(body):
        code = main(argv[1:])
        err = capsys.readouterr().err
        assert code == 0, f"README line {line}: `{shlex.join(argv)}` exited {code}: {err[-500:]}"
