"""Small derived-data caches under MEDGEM_HOME (GGUF indexes, tokenizers): atomic writes, bounded size.

Cache keys include the source file's size and mtime, so every new file (an exported or fine-tuned GGUF,
a test's temporary model) adds entries that nothing would ever remove. Each cache folder therefore keeps
only its `KEEP` most recently used files: a hit refreshes the file's mtime, a write prunes the rest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

KEEP = 16


def read(path: Path) -> bytes | None:
    """The cached bytes, or None on a miss (including a file another process just pruned)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(path)  # most recently used
    return data


def write(path: Path, data: bytes, keep: int = KEEP) -> None:
    """Write atomically (a killed process leaves no half file), then drop all but the `keep` newest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    entries = [p for p in path.parent.iterdir() if p.is_file() and not p.name.endswith(".partial")]
    entries.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0.0, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)
