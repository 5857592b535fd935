"""Issue 21: a fixed corpus of hostile files through every CLI command that reads files.

Each runs as its own process under an address-space cap, with a 60 s timeout: exit 2 and one clear
line naming the file (never its content, never "internal error"), at most 2 GB of peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import medgem

SRC = str(Path(medgem.__file__).resolve().parents[1])  # children run the medgem this test imported
SECRET = "Testpatient"
CAP = 6 << 30  # address space: torch reserves more than it touches; RSS is checked below


# The child reports its own peak RSS at exit: VmHWM belongs to the exec'd image (ru_maxrss survives fork
# and exec, so it would report the test process's own peak; RUSAGE_CHILDREN, the largest child of the run).
_RUN = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('\\nPEAK_KB %s\\n' % next("
        "line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))); "
        "from medgem.cli import main; sys.exit(main(sys.argv[1:]))")


def medgem(*argv: str, cwd: Path) -> tuple[int, str, float, float]:
    """(exit code, stderr, peak RSS in MB, seconds) of `medgem ARGV` in a capped child process."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", _RUN, *argv], cwd=cwd, env=env, preexec_fn=cap,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"medgem {' '.join(argv)} ran past 60 s")
    err, _, peak = err.rpartition("\nPEAK_KB ")
    return child.returncode, err, int(peak.split()[0]) / 1024, time.monotonic() - started


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, hostile) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    os.mkfifo(root / "pipe.dcm")
    os.mkfifo(root / "pipe.json")
    (root / "bomb.dcm").write_bytes(hostile.deflate_bomb(1000, 1000, 200))  # refused once 96 MB have inflated
    (root / "huge.png").write_bytes(hostile.png_header(50_000, 50_000))
    deep = hostile.deep_json(100_000)
    (root / "deep.json").write_bytes(b'{"resourceType": "Bundle", "entry": [' + deep + b"]}")
    (root / "deep.jsonl").write_bytes(deep + b"\n")
    (root / "latin1.jsonl").write_bytes(f'{{"question": "{SECRET} caf\xe9"}}\n'.encode("latin-1"))
    (root / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (root / "damaged").mkdir()
    (root / "damaged" / "index.sqlite").write_bytes(b"SQLite format 3\0" + bytes(200))
    return root


CASES = [
    (["dicom", "info", "pipe.dcm"], "pipe.dcm: not a regular file"),
    (["dicom", "preview", "pipe.dcm", "-o", "o.png"], "pipe.dcm: not a regular file"),
    (["dicom", "preview", "bomb.dcm", "-o", "o.png"], "bomb.dcm: the deflated DICOM data inflates to more than"),
    (["dicom", "info", "bomb.dcm"], "bomb.dcm: the deflated DICOM data inflates to more than"),
    (["dicom", "preview", "huge.png", "-o", "o.png"], "huge.png: the image is too large"),
    (["dicom", "preview", "ct.dcm", "--size", "-5", "-o", "o.png"], "--size: must be at least 1"),
    (["dicom", "preview", "ct.dcm", "--size", "0", "-o", "o.png"], "--size: must be at least 1"),
    (["dicom", "preview", "ct.dcm", "--slices", "0", "-o", "o.png"], "--slices: must be at least 1"),
    (["ehr", "timeline", "deep.json"], "deep.json: JSON nested deeper than 64 levels"),
    (["ehr", "timeline", "pipe.json"], "pipe.json: not a regular file"),
    (["ehr", "ask", "deep.json", "Latest potassium?"], "deep.json: JSON nested deeper than 64 levels"),
    (["ehr", "ask", "--qa", "latin1.jsonl", "--out", "o.jsonl"], "latin1.jsonl: not UTF-8 text"),
    (["ehr", "ask", "--qa", "deep.jsonl", "--out", "o.jsonl"], "deep.jsonl line 1: JSON nested deeper"),
    (["eval", "medqa", "--data", "deep.jsonl", "--out", "ev"], "deep.jsonl:1: JSON nested deeper"),
    (["eval", "medqa", "--data", "latin1.jsonl", "--out", "ev"], "latin1.jsonl: not UTF-8 text"),
    (["eval", "medqa", "--data", "pipe.json", "--out", "ev"], "pipe.json: not a regular file"),
    (["index", "info", "damaged"], "damaged: index.sqlite is damaged"),
]


@pytest.mark.parametrize("argv, said", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_hostile_file_is_exit_2_with_a_clear_line(corpus, argv, said):
    code, err, peak_mb, seconds = medgem(*argv, cwd=corpus)
    assert code == 2, err
    assert said in err, err
    assert "internal error" not in err and "Traceback" not in err and SECRET not in err
    assert peak_mb < 2048 and seconds < 60


@pytest.mark.slow
@pytest.mark.parametrize("data", ["deep.jsonl", "latin1.jsonl"])
def test_finetune_sft_on_hostile_data(corpus, data):
    code, err, peak_mb, _ = medgem("finetune", "sft", data, "--out", "ft", cwd=corpus)
    assert code == 2 and "internal error" not in err and SECRET not in err, err
    assert data in err and peak_mb < 2048


@pytest.mark.slow
def test_generate_takes_a_non_utf8_argv_prompt():
    """A prompt that is not valid UTF-8 (argv surrogates) is text, not sentencepiece's TypeError."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "medgem.cli", "generate", "--max-new-tokens", "2", "--raw"]
    by_argv = subprocess.run([*base, b"The chest \xff\xfe X-ray"], capture_output=True, timeout=300, env=env)
    assert by_argv.returncode == 0, by_argv.stderr.decode(errors="replace")
