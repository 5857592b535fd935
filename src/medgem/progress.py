"""What a slow step is waiting for, shown on a terminal: one spinner line on stderr.

Every slow step (assembling or loading a model, compiling a kernel, a benchmark, answering over a record)
wraps itself in `step("what it waits for")`, whichever layer it lives in. Nothing is drawn unless a face
turned it on with `configure()` and stderr is a terminal, so piped output and library use stay clean.
Nested steps show the innermost label; the line is erased when the outermost step ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FRAMES = "-\\|/"  # ASCII: every terminal encoding shows it
DELAY_S = 0.3  # steps that end sooner draw nothing (no flicker)
TICK_S = 0.1


class _Label:
    """One open step's text; counted work rewrites it in place."""

    def __init__(self, text: str):
        self.text = text


_enabled = False
_labels: list[_Label] = []
_lock = threading.Lock()
_wake = threading.Condition(_lock)
_thread: threading.Thread | None = None


def configure(quiet: bool = False) -> bool:
    """Turn the spinner on for this process when stderr is a terminal and neither --quiet nor MEDGEM_QUIET=1
    asks for silence; returns whether it is on."""
    global _enabled
    _enabled = not quiet and os.environ.get("MEDGEM_QUIET", "0") != "1" and sys.stderr.isatty()
    return _enabled


def enabled() -> bool:
    """Whether progress goes to the terminal: tqdm bars of counted work (`disable=not enabled()`) follow it too."""
    return _enabled


@contextmanager
def step(label: str) -> Iterator[_Label]:
    """Show `label` with a spinner and the seconds spent while the block runs (a no-op when off)."""
    global _thread
    entry = _Label(label)
    if not _enabled:
        yield entry
        return
    with _lock:
        _labels.append(entry)
        if _thread is None:
            _thread = threading.Thread(target=_draw, args=(time.monotonic(),), name="medgem-progress", daemon=True)
            _thread.start()
    try:
        yield entry
    finally:
        with _lock:
            _labels.remove(entry)
            _wake.notify_all()
            drawer = _thread if not _labels else None
        if drawer is not None:
            drawer.join()  # the line is erased before anything else is printed


@contextmanager
def counted(label: str, total: int) -> Iterator[Callable[[], None]]:
    """`step` for counted work, e.g. 85 CT slices through the vision tower: yields a tick to call after each
    item, and the line reads "label 3/85". One line with the spinner, so the two never fight over stderr."""
    done = 0
    with step(f"{label} 0/{total}") as entry:

        def tick() -> None:
            nonlocal done
            done += 1
            with _lock:
                entry.text = f"{label} {done}/{total}"

        yield tick


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80  # a new pty may say 0
    except (OSError, ValueError, AttributeError):
        return 80


def _draw(start: float) -> None:
    """The spinner thread: redraw every tick until no step is left, then erase the line."""
    global _thread
    drawn, frame = False, 0
    with _lock:
        while _labels:
            elapsed = time.monotonic() - start
            if elapsed >= DELAY_S:
                line = f"{FRAMES[frame % len(FRAMES)]} {_labels[-1].text}... {elapsed:.0f} s"
                width = _columns() - 1  # a wrapped line could not be redrawn in place
                sys.stderr.write("\r\x1b[K" + (line if len(line) <= width else line[: width - 3] + "..."))
                sys.stderr.flush()
                drawn, frame = True, frame + 1
            _wake.wait(TICK_S)
        if drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        _thread = None
