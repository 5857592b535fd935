"""The in-process CLI runner shared by this area's tests: argparse, the model flags and the file checks all
fail before any model loads, so a refused input costs milliseconds."""

from __future__ import annotations

import pytest

from medgem.cli import main


@pytest.fixture
def cli(capsys):
    """`medgem ARGS...` in-process: (exit code, stdout, stderr); argparse's exits count as exit codes."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as done:
            code = done.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_error(code: int, err: str) -> str:
    """Exit 2 and exactly one `medgem: error:` line, no traceback, no usage block; that line."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[medgem is not")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("medgem: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]
