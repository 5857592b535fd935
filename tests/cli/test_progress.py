"""Slow steps say what they wait for on a terminal, and print nothing extra when stderr is piped (issue 22).

`medgem bench` is the check: it loads the model (seconds) and then benchmarks it, the two kinds of wait a
user meets first. Its stderr is a real pseudo-terminal in one run and a pipe in the other.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from medgem import progress

BENCH = ["bench", "--prompt-tokens", "8", "--new-tokens", "3", "--runs", "1"]
# Long enough that the benchmarking step outlasts the spinner's DELAY_S even on a fast CPU (CI's ran the
# 3-token one in under 0.3 s, so it drew nothing): 3 x 48 decoded tokens take over a second anywhere.
SLOW_BENCH = ["bench", "--prompt-tokens", "8", "--new-tokens", "48", "--runs", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("MEDGEM_QUIET", None)
    return env


def run_on_terminal(*args: str, **env: str) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal showed on stderr) of `medgem ARGS` with stderr on a pty."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "medgem.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=_env(**env))
    os.close(slave)
    shown = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown.append(data)
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), out, b"".join(shown).decode(errors="replace")


def test_a_slow_command_shows_what_it_waits_for_on_a_terminal():
    code, out, shown = run_on_terminal(*SLOW_BENCH)
    assert code == 0, shown
    assert "loading the embedded Gemma 3 270M" in shown and "benchmarking" in shown
    assert "\x1b[K" in shown  # each frame redraws one line, and the last erases it
    assert "decode_tok_s" in out  # the result itself goes to stdout, untouched


def test_quiet_turns_it_off_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    try:
        assert progress.configure() and not progress.configure(quiet=True)
        monkeypatch.setenv("MEDGEM_QUIET", "1")
        assert not progress.configure()
    finally:
        progress.configure(quiet=True)


def test_a_piped_run_prints_nothing_extra():
    piped = subprocess.run([sys.executable, "-m", "medgem.cli", *BENCH], capture_output=True, text=True,
                           env=_env(), timeout=120)
    assert piped.returncode == 0, piped.stderr
    lines = [line for line in piped.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[medgem is not a medical device"), piped.stderr
    assert "\r" not in piped.stderr and "\x1b" not in piped.stderr


def test_counted_work_shows_how_far_it_is(monkeypatch):
    """The vision tower's line for a CT volume: "image 2/3" while it runs, erased at the end."""
    import io
    import time

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    try:
        assert progress.configure()
        with progress.counted("vision tower: image", 3) as tick:
            tick()
            tick()
            time.sleep(progress.DELAY_S + 3 * progress.TICK_S)
        assert "vision tower: image 2/3" in screen.getvalue()
        assert screen.getvalue().endswith("\r\x1b[K")
    finally:
        progress.configure(quiet=True)
