"""Text and JSON as they enter medgem: normalised once, bounded in depth, named in every error.

`clean_text` replaces what tokenizers and encoders choke on (a lone surrogate is legal in JSON text
and in a non-UTF-8 argv, but sentencepiece raises TypeError on it; NUL bytes end C strings).
`loads_json` refuses nesting deeper than `MAX_JSON_DEPTH` before parsing, because Python's parser
recurses (RecursionError) and tree builders such as ijson's cost memory with the square of the depth.
`read_text` refuses files over `MAX_DATA_MB` (MEDGEM_MAX_DATA_MB) before reading them: data files are read
whole and parsed into Python objects several times their size, so a huge one would end in the kernel's
OOM killer rather than in a message.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medgem.errors import ConfigError, InputError

MAX_JSON_DEPTH = 64  # FHIR resources nest about 10 deep; OpenAI bodies about 6
MAX_DATA_MB = 256  # a published eval split is under 20 MB; larger SFT sets raise MEDGEM_MAX_DATA_MB
_SURROGATES = re.compile("[\ud800-\udfff]")
_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_CHUNK = 1 << 20  # brackets counted per slice, so a file of brackets needs no int64 per byte


def clean_text(text: str) -> str:
    """Lone surrogates become U+FFFD and NULs are dropped; everything else is kept as it is."""
    if text.isascii():
        return text.replace("\0", "")
    return _SURROGATES.sub("\ufffd", text).replace("\0", "")


def clean_json(value: Any) -> Any:
    """clean_text on every string (keys too) of parsed JSON; depth is already bounded by the parser."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_json(v) for k, v in value.items()}
    return value


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, without parsing it (strings skipped).

    Escaped backslashes and quotes are dropped, then everything but quotes and brackets (both in C);
    a bracket after an odd number of quotes is inside a string. Linear, with a bounded copy per slice.
    """
    marks = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_MARKS)
    depth = deepest = inside = 0
    for start in range(0, len(marks), _CHUNK):
        part = np.frombuffer(marks, np.uint8, min(_CHUNK, len(marks) - start), start)
        in_string = (np.cumsum(part == 0x22, dtype=np.int32) + inside) & 1
        levels = np.cumsum(np.where(in_string, 0, _STEP[part]), dtype=np.int64) + depth
        deepest, depth, inside = max(deepest, int(levels.max())), int(levels[-1]), int(in_string[-1])
    return deepest


def check_depth(data: bytes | str, name: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON text nested deeper than `max_depth` before a parser recurses into it."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if json_depth(raw) > max_depth:
        raise InputError(f"{name}: JSON nested deeper than {max_depth} levels")


def loads_json(data: bytes | str, name: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text (from `name`, a file or field the message names) within the depth limit."""
    check_depth(data, name, max_depth)
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise InputError(f"{name}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{name}: not valid JSON{where}") from None


def jsonl_objects(text: str, where: Callable[[int], str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of JSON Lines text, each within the depth limit; a
    line that is not a JSON object is an InputError naming `where(line number)`."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        place = where(number)
        check_depth(line, place)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{place}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{place}: expected a JSON object per line")
        yield number, record


def max_data_bytes() -> int:
    """The size limit of a data file read whole: MEDGEM_MAX_DATA_MB, else MAX_DATA_MB."""
    raw = os.environ.get("MEDGEM_MAX_DATA_MB", "").strip()
    try:
        mb = float(raw) if raw else MAX_DATA_MB
    except ValueError:
        mb = 0
    if not mb > 0:
        raise ConfigError("MEDGEM_MAX_DATA_MB must be a positive number of MiB")
    return int(mb * 2**20)


def check_size(path: str | os.PathLike[str], name: str | None = None) -> None:
    """Refuse a regular file larger than max_data_bytes() before it is read (FIFOs: check_regular_file)."""
    from medgem.inputs.dicom import source_name

    limit, size = max_data_bytes(), os.stat(path).st_size
    if size > limit:
        raise InputError(f"{name or source_name(path)}: {size / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB "
                         "limit for a data file (MEDGEM_MAX_DATA_MB raises it)")


def read_text(path: str | os.PathLike[str], name: str | None = None, encoding: str = "utf-8") -> str:
    """A regular file's text within the size limit; a FIFO, device, missing, over-large or non-UTF-8 file
    is an InputError naming it."""
    from medgem.inputs.dicom import check_regular_file, source_name

    check_regular_file(path)
    check_size(path, name)
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise InputError(f"{name or source_name(path)}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{name or source_name(path)}: cannot read the file ({type(exc).__name__})") from None


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV with a header (a BOM allowed), under the same checks as read_text."""
    from medgem.inputs.dicom import check_regular_file, source_name

    check_regular_file(path)
    check_size(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{source_name(path)}: cannot read as CSV ({type(exc).__name__})") from None
