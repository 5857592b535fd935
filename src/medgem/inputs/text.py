"""Text and JSON as they enter medgem: normalised once, bounded in depth, named in every error.

`clean_text` replaces what tokenizers and encoders choke on (a lone surrogate is legal in JSON text
and in a non-UTF-8 argv, but sentencepiece raises TypeError on it; NUL bytes end C strings).
`loads_json` refuses nesting deeper than `MAX_JSON_DEPTH` before parsing, because Python's parser
recurses (RecursionError) and tree builders such as ijson's cost memory with the square of the depth.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medgem.errors import InputError

MAX_JSON_DEPTH = 64  # FHIR resources nest about 10 deep; OpenAI bodies about 6
_SURROGATES = re.compile("[\ud800-\udfff]")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


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
    """The deepest nesting of arrays and objects in JSON text, without parsing it (strings skipped)."""
    bare = np.frombuffer(_JSON_STRING.sub(b"", data), np.uint8)
    steps = np.isin(bare, (0x5B, 0x7B)).astype(np.int32) - np.isin(bare, (0x5D, 0x7D))
    return int(np.cumsum(steps).max(initial=0))


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


def read_text(path: str | os.PathLike[str], name: str | None = None, encoding: str = "utf-8") -> str:
    """A regular file's text; a FIFO, device, missing file or non-UTF-8 content is an InputError naming it."""
    from medgem.inputs.dicom import check_regular_file, source_name

    check_regular_file(path)
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise InputError(f"{name or source_name(path)}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{name or source_name(path)}: cannot read the file ({type(exc).__name__})") from None
