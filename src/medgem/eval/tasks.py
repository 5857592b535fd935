"""Evaluation tasks read in their published formats, turned into one `Item` shape.

Every reader returns a `Task`: a kind (how it is prompted and scored) and a list of `Item`s. Fields
the format does not use as question or answer (subject, sex, age band, site, modality...) are kept
in `Item.meta`, so any of them can become a subgroup. A malformed file raises `InputError` naming
the file and the line (or record) at fault, never the question text.

Formats, as the datasets publish them:
- medqa: JSONL, `question`, `options` {"A": .., "B": .., ...}, `answer_idx` (letter).
- medmcqa: JSON lines, `question`, `opa`..`opd`, `cop` (1-4 in the released files, 0-3 in the
  Hugging Face copy: a file with any 0 is read as 0-based), optional `id`.
- pubmedqa: the released `ori_pqal.json` (an object keyed by PMID with QUESTION, CONTEXTS,
  final_decision) or JSONL rows (question, context{contexts} or contexts, final_decision).
- mmlu: CSV `question,A,B,C,D,answer`, with a header row or headerless as in the released files
  (then the subject comes from the file name, e.g. `anatomy_test.csv`).
- vqa: SLAKE (`img_name`, `q_lang`...) or VQA-RAD (`image_name`, `qid`...) JSON lists with
  `question`, `answer`, `answer_type` CLOSED/OPEN. Images resolve against the JSON's folder, its
  `imgs/` (SLAKE) or `VQA_RAD Image Folder/`.
- classify: CSV `path,label`; several labels in one cell separated by `|` make it multi-label.
- report: JSONL or CSV with `image` (or `path`) and `report` (or `reference`, `findings`).
- ehrqa: JSONL `question`, `answer`, `answer_type` (quantity, date, yes_no, count) and the record,
  either inline text (`context`) or a FHIR file (`bundle`, relative to the JSONL), as
  `medgem ehr synth` writes it; `sex`, `age_band`, `kind`... become metadata.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgem.errors import InputError
from medgem.inputs.dicom import check_regular_file
from medgem.inputs.text import check_depth, check_size, jsonl_objects, read_text

LETTERS = "ABCDEFGHIJ"
BUILTIN = {"handwritten": Path(__file__).resolve().parent.parent / "data" / "mcq_handwritten.jsonl"}


@dataclass
class Item:
    """One question (or image) with its gold answer; `meta` holds every other scalar field."""

    id: str
    question: str
    answer: Any  # MCQ: letter; VQA/EHR-QA/report: text; classify: list of labels
    options: dict[str, str] = field(default_factory=dict)
    context: str = ""
    image: str | None = None
    record: str | None = None  # EHR-QA: the FHIR file the question is about
    answer_type: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Task:
    """A named set of items; `kind` picks the prompt and the scorer (mcq, vqa, classify, report, ehrqa)."""

    name: str
    kind: str
    path: Path
    items: list[Item]
    labels: list[str] = field(default_factory=list)  # classify only: every label, in a fixed order
    multi_label: bool = False

    def sha256(self) -> str:
        """Content hash, so a resumed run can refuse a data file that changed under it."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def _scalar_meta(record: dict[str, Any], used: set[str]) -> dict[str, str]:
    """Unused scalar fields as strings (lists and nested objects cannot be subgroups, so they are dropped)."""
    return {
        str(k): str(v)
        for k, v in record.items()
        if k not in used and v is not None and isinstance(v, str | int | float | bool)
    }


def _need(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record or record[key] is None or record[key] == "":
        raise InputError(f"{where}: missing field '{key}'")
    return record[key]


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each non-blank line; `where` is 'file:line' for error messages."""
    for n, record in jsonl_objects(read_text(path), lambda n: f"{path}:{n}"):
        yield f"{path}:{n}", record


def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records of a JSON list (or JSON lines); `where` names the record index or line."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        yield from _jsonl(path)
        return
    check_depth(text, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {i}: expected a JSON object")
        yield f"{path}: record {i}", record


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    check_size(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if row and any(cell.strip() for cell in row):
                    yield n, row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read as CSV ({type(exc).__name__})") from None


def _csv_dicts(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV with a header, keys lower-cased and stripped."""
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path}: empty CSV")
    header = [h.strip().lower() for h in first[1]]
    for n, row in rows:
        if len(row) != len(header):
            raise InputError(f"{path}:{n}: {len(row)} columns, the header has {len(header)}")
        yield f"{path}:{n}", dict(zip(header, (c.strip() for c in row)))


def _mcq_item(
    where: str, qid: str, question: Any, options: dict[str, Any], answer: str, meta: dict[str, str]
) -> Item:
    opts = {str(k).strip().upper(): str(v).strip() for k, v in options.items() if str(v).strip()}
    if len(opts) < 2 or any(k not in LETTERS for k in opts):
        raise InputError(f"{where}: options must be at least two letter keys A, B, C...")
    answer = str(answer).strip().upper()
    if answer not in opts:
        raise InputError(f"{where}: answer '{answer}' is not one of the options {sorted(opts)}")
    return Item(id=qid, question=str(question).strip(), answer=answer, options=opts, meta=meta)


def read_medqa(path: Path) -> Task:
    items = []
    for where, r in _jsonl(path):
        options = _need(r, "options", where)
        if isinstance(options, list):  # some copies store [{"key": "A", "value": ...}, ...]
            options = {o.get("key"): o.get("value") for o in options if isinstance(o, dict)}
        if not isinstance(options, dict):
            raise InputError(f"{where}: 'options' must be an object like {{\"A\": ..., \"B\": ...}}")
        qid = str(r.get("id", where.rsplit(":", 1)[1]))
        used = {"id", "question", "options", "answer_idx", "answer"}
        items.append(
            _mcq_item(where, qid, _need(r, "question", where), options, _need(r, "answer_idx", where),
                      _scalar_meta(r, used))
        )
    return _task("medqa", "mcq", path, items)


def read_medmcqa(path: Path) -> Task:
    records = list(_jsonl(path))
    cops = [r.get("cop") for _, r in records]
    zero_based = any(c == 0 or c == "0" for c in cops)
    if zero_based and any(c == 4 or c == "4" for c in cops):
        raise InputError(f"{path}: 'cop' holds both 0 and 4; use 1-4 (released files) or 0-3 throughout")
    items = []
    for where, r in records:
        cop = _need(r, "cop", where)
        if isinstance(cop, str) and cop.strip().lower() in ("a", "b", "c", "d"):
            letter = cop.strip().upper()
        else:
            try:
                letter = "ABCD"[int(cop) - (0 if zero_based else 1)]
            except (ValueError, IndexError):
                raise InputError(f"{where}: 'cop' must be 1-4 (or 0-3, or a-d), got {cop!r}") from None
        options = {k: _need(r, f"op{k.lower()}", where) for k in "ABCD"}
        used = {"id", "question", "opa", "opb", "opc", "opd", "cop"}
        qid = str(r.get("id", where.rsplit(":", 1)[1]))
        items.append(_mcq_item(where, qid, _need(r, "question", where), options, letter, _scalar_meta(r, used)))
    return _task("medmcqa", "mcq", path, items)


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa_item(where: str, qid: str, r: dict[str, Any]) -> Item:
    lower = {k.lower(): v for k, v in r.items()}
    contexts = lower.get("contexts")
    if contexts is None and isinstance(lower.get("context"), dict):
        contexts = {k.lower(): v for k, v in lower["context"].items()}.get("contexts")
    if contexts is None:
        contexts = lower.get("context")
    if isinstance(contexts, str):
        contexts = [contexts]
    if not isinstance(contexts, list) or not contexts:
        raise InputError(f"{where}: missing 'contexts' (a list of abstract passages)")
    decision = str(_need(lower, "final_decision", where)).strip().lower()
    letter = {v: k for k, v in PUBMEDQA_OPTIONS.items()}.get(decision)
    if letter is None:
        raise InputError(f"{where}: final_decision must be yes, no or maybe, got {decision!r}")
    used = {"question", "contexts", "context", "final_decision", "pubid", "long_answer"}
    item = _mcq_item(where, qid, _need(lower, "question", where), PUBMEDQA_OPTIONS, letter,
                     _scalar_meta(lower, used))
    item.context = "\n".join(str(c) for c in contexts)
    return item


def read_pubmedqa(path: Path) -> Task:
    text = read_text(path)
    items = []
    check_depth(text, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSON lines (or broken JSON, which the line reader reports with its line)
    keyed = isinstance(data, dict) and not {"question", "QUESTION"} & set(data)
    if keyed:
        for pmid, r in data.items():
            if not isinstance(r, dict):
                raise InputError(f"{path}: entry {pmid}: expected an object")
            items.append(_pubmedqa_item(f"{path}: entry {pmid}", str(pmid), r))
    else:
        for where, r in _jsonl(path):
            qid = str(r.get("pubid", r.get("id", where.rsplit(":", 1)[1])))
            items.append(_pubmedqa_item(where, qid, r))
    return _task("pubmedqa", "mcq", path, items)


def read_mmlu(path: Path) -> Task:
    rows = list(_csv_rows(path))
    if not rows:
        raise InputError(f"{path}: empty CSV")
    header = [h.strip().lower() for h in rows[0][1]]
    items = []
    if {"question", "a", "b", "answer"} <= set(header):
        body = rows[1:]
    else:  # released layout: no header, six columns, the subject in the file name
        header = ["question", "a", "b", "c", "d", "answer"]
        body = rows
    subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    for n, row in body:
        where = f"{path}:{n}"
        if len(row) != len(header):
            raise InputError(f"{where}: {len(row)} columns, expected {len(header)} ({','.join(header)})")
        r = dict(zip(header, (c.strip() for c in row)))
        options = {k.upper(): r[k] for k in "abcdefghij" if k in r}
        answer = r["answer"]
        if answer.isdigit():  # the Hugging Face copy stores the answer as an index 0-3
            answer = LETTERS[int(answer)] if int(answer) < len(options) else answer
        meta = _scalar_meta(r, {"question", "answer", "id", *"abcdefghij"})
        meta.setdefault("subject", subject)
        items.append(_mcq_item(where, r.get("id") or str(n), r["question"], options, answer, meta))
    return _task("mmlu", "mcq", path, items)


def _resolve_file(path: Path, name: str, where: str, subdirs: tuple[str, ...] = ()) -> str:
    """An image or record named in a data file, relative to that file's folder (or the given subfolders)."""
    candidates = [path.parent / name] + [path.parent / d / name for d in subdirs]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise InputError(f"{where}: file '{name}' not found next to {path.name} (looked in {len(candidates)} places)")


def read_vqa(path: Path) -> Task:
    items = []
    for where, r in _json_records(path):
        image_name = r.get("img_name", r.get("image_name", r.get("image")))
        if not image_name:
            raise InputError(f"{where}: missing 'img_name' (SLAKE) or 'image_name' (VQA-RAD)")
        answer_type = str(_need(r, "answer_type", where)).strip().lower()
        if answer_type not in ("closed", "open"):
            raise InputError(f"{where}: answer_type must be CLOSED or OPEN, got {answer_type!r}")
        qid = str(r.get("qid", r.get("id", where.rsplit(" ", 1)[-1])))
        used = {"qid", "id", "img_name", "image_name", "image", "question", "answer", "answer_type",
                "img_id"}
        items.append(Item(
            id=qid, question=str(_need(r, "question", where)).strip(),
            answer=str(_need(r, "answer", where)).strip(), answer_type=answer_type,
            image=_resolve_file(path, str(image_name), where, ("imgs", "VQA_RAD Image Folder")),
            meta=_scalar_meta(r, used),
        ))
    return _task("vqa", "vqa", path, items)


def read_classify(path: Path) -> Task:
    items = []
    for where, r in _csv_dicts(path):
        labels = [s.strip() for s in _need(r, "label", where).split("|") if s.strip()]
        image = _resolve_file(path, _need(r, "path", where), where)
        items.append(Item(id=r.get("id") or where.rsplit(":", 1)[1], question="", answer=labels, image=image,
                          meta=_scalar_meta(r, {"path", "label", "id"})))
    task = _task("classify", "classify", path, items)
    task.labels = sorted({lab for it in items for lab in it.answer})
    task.multi_label = any(len(it.answer) > 1 for it in items)
    if len(task.labels) < 2:
        raise InputError(f"{path}: a classification set needs at least two distinct labels")
    return task


def read_report(path: Path) -> Task:
    records = _csv_dicts(path) if path.suffix.lower() == ".csv" else _jsonl(path)
    items = []
    for where, r in records:
        image = r.get("image") or r.get("path")
        reference = r.get("report") or r.get("reference") or r.get("findings")
        if not image or not reference:
            raise InputError(f"{where}: needs 'image' (or 'path') and 'report' (or 'reference', 'findings')")
        used = {"image", "path", "report", "reference", "findings", "id"}
        qid = r.get("id")
        items.append(Item(id=where.rsplit(":", 1)[1] if qid in (None, "") else str(qid), question="", answer=str(reference),
                          image=_resolve_file(path, str(image), where), meta=_scalar_meta(r, used)))
    return _task("report", "report", path, items)


def read_ehrqa(path: Path) -> Task:
    items = []
    for where, r in _jsonl(path):
        record = r.get("bundle")
        if not r.get("context") and not record:
            raise InputError(f"{where}: needs the record, as 'context' (text) or 'bundle' (a FHIR file)")
        used = {"id", "question", "answer", "answer_type", "context", "bundle"}
        items.append(Item(
            id=str(r.get("id", where.rsplit(":", 1)[1])), question=str(_need(r, "question", where)).strip(),
            answer=str(_need(r, "answer", where)).strip(), answer_type=str(r.get("answer_type") or "").strip(),
            context=str(r.get("context") or ""), record=_resolve_file(path, str(record), where) if record else None,
            meta=_scalar_meta(r, used),
        ))
    return _task("ehrqa", "ehrqa", path, items)


def _task(name: str, kind: str, path: Path, items: list[Item]) -> Task:
    if not items:
        raise InputError(f"{path}: no items")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise InputError(f"{path}: duplicate item id '{it.id}' (ids key the resumable cache)")
        seen.add(it.id)
    return Task(name=name, kind=kind, path=path, items=items)


READERS: dict[str, Callable[[Path], Task]] = {
    "medqa": read_medqa,
    "medmcqa": read_medmcqa,
    "pubmedqa": read_pubmedqa,
    "mmlu": read_mmlu,
    "vqa": read_vqa,
    "classify": read_classify,
    "report": read_report,
    "ehrqa": read_ehrqa,
}


def load_task(name: str, data: str | Path) -> Task:
    """Read `data` as task `name`; `data` may be a built-in set name (e.g. 'handwritten')."""
    if name not in READERS:
        raise InputError(f"unknown task '{name}'; choose one of {', '.join(READERS)}")
    path = BUILTIN.get(str(data), Path(data))
    if not path.exists():
        raise InputError(f"data file not found: {path}")
    check_regular_file(path)  # a FIFO would block the read forever
    return READERS[name](path)
