"""EHR question answering: prompts a small base model can follow, and exact-match scoring.

The embedded model is a 270M *base* model, so prompts are plain completions: the record, the
question, one line saying what shape the answer takes, then "Answer:". Generation
stops at the end of the line, and the answer is read back by type: a yes/no word, a date, a whole
number, or a number with its unit.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from medgem.ehr.context import Context, ContextBuilder
from medgem.ehr.deid import deidentify
from medgem.ehr.timeline import Timeline
from medgem.inputs.fhir import load_record

ANSWER_TYPES = ("quantity", "date", "yes_no", "count")
# No example values: a base model copies them verbatim instead of reading the record.
FORMATS = {
    "quantity": "Answer with the number and its unit, copied from the record.",
    "date": "Answer with the date as YYYY-MM-DD.",
    "yes_no": "Answer with one word, yes or no.",
    "count": "Answer with a whole number.",
    None: "Answer in one short sentence.",
}
STOP = ["\n"]
MAX_NEW_TOKENS = 16

_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*([A-Za-z%/\[\]\d.]*[A-Za-z%\]])?")
_ISO = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_US = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10}  # fmt: skip


def infer_answer_type(question: str) -> str | None:
    """A best guess for free questions typed at the CLI; the QA set states its types."""
    q = question.lower().strip()
    if q.startswith("when") or " date " in f" {q} ":
        return "date"
    if q.startswith("how many"):
        return "count"
    if q.split(" ", 1)[0] in {"is", "are", "does", "do", "did", "has", "have", "was", "were"}:
        return "yes_no"
    if any(w in q for w in ("result", "value", "level", "dose")):
        return "quantity"
    return None


def build_prompt(context: str, question: str, answer_type: str | None) -> str:
    """A completion prompt: record, question, answer format, 'Answer:'."""
    return f"Patient record:\n{context}\n\nQuestion: {question}\n{FORMATS[answer_type]}\nAnswer:"


def extract(text: str, answer_type: str | None) -> str:
    """The answer in canonical form ("yes", "2019-03-14", "3", "4.2 mmol/L"), or "" if none is found."""
    text = text.strip()
    if answer_type == "yes_no":
        m = re.search(r"\b(yes|no)\b", text, re.I)
        return m.group(1).lower() if m else ""
    if answer_type == "date":
        for pattern, order in ((_ISO, (0, 1, 2)), (_US, (2, 0, 1))):
            if m := pattern.search(text):
                y, mo, d = (int(m.group(i + 1)) for i in order)
                try:
                    return dt.date(y, mo, d).isoformat()
                except ValueError:
                    return ""
        return ""
    if answer_type == "count":
        m = re.search(r"\b(\d+|" + "|".join(_WORDS) + r")\b", text, re.I)
        if not m:
            return ""
        word = m.group(1).lower()
        return str(_WORDS[word] if word in _WORDS else int(word))
    if answer_type == "quantity":
        m = _NUMBER.search(text)
        return f"{float(m.group(1)):g} {m.group(2) or ''}".strip() if m else ""
    return text.splitlines()[0].strip() if text else ""


def exact_match(prediction: str, gold: str, answer_type: str | None) -> bool:
    """Whether the prediction's extracted answer equals the gold one.

    Quantities compare by number, and by unit when the prediction gives one (a bare "4.2" for
    "4.2 mmol/L" counts; "4.2 mg/dL" does not).
    """
    got, want = extract(prediction, answer_type), extract(gold, answer_type)
    if not got:
        return False
    if answer_type == "quantity":
        (g_num, _, g_unit), (w_num, _, w_unit) = got.partition(" "), want.partition(" ")
        return float(g_num) == float(w_num) and (not g_unit or g_unit.lower() == w_unit.lower())
    return got.lower() == want.lower()


# --- asking about records ----------------------------------------------------------------------


class Asker:
    """Turns (record file, question) into a budgeted prompt, reusing each record's context builder.

    `budget` bounds the whole prompt (context, question and answer format) in `count_tokens` units.
    With `deid`, records are de-identified before anything is rendered.
    """

    def __init__(self, count_tokens, budget: int, *, deid: bool = False, seed: int = 0, embedder=None,
                 window: int | None = None, lenient: bool = False, patient_id: str | None = None):  # fmt: skip
        self.count, self.budget, self.deid, self.seed = count_tokens, budget, deid, seed
        self.embedder, self.window, self.lenient, self.patient_id = embedder, window, lenient, patient_id
        self._builders: dict[str, ContextBuilder] = {}

    def builder(self, path: str | Path) -> ContextBuilder:
        key = str(path)
        if key not in self._builders:
            if len(self._builders) >= 8:  # QA files are grouped by record: keep only a few
                self._builders.pop(next(iter(self._builders)))
            record = load_record(path, lenient=self.lenient, patient_id=self.patient_id)
            if self.deid:
                record = deidentify(record, self.seed)
            self._builders[key] = ContextBuilder(Timeline(record), self.count, self.embedder)
        return self._builders[key]

    def prompt(self, path: str | Path, question: str, answer_type: str | None) -> tuple[str, Context]:
        """The prompt and the context inside it."""
        overhead = self.count(build_prompt("", question, answer_type)) + 1  # + BOS
        context = self.builder(path).build(question, self.budget - overhead, self.window)
        return build_prompt(context.text, question, answer_type), context


def evidence_found(item: dict, context: Context) -> bool:
    """Whether every fact a QA item needs is in the context (a resource shown, or a fixed section)."""
    return all(e.get("ref") in context.refs or e.get("section") in context.sections for e in item["evidence"])


def accuracy_table(rows: list[dict]) -> dict:
    """Exact-match accuracy overall and per question kind, sex and age band."""
    out: dict = {"n": len(rows), "exact_match": sum(r["correct"] for r in rows) / max(len(rows), 1)}
    for key in ("kind", "sex", "age_band"):
        groups: dict[str, list[bool]] = {}
        for r in rows:
            groups.setdefault(str(r.get(key)), []).append(r["correct"])
        out[f"by_{key}"] = {g: {"n": len(v), "exact_match": sum(v) / len(v)} for g, v in sorted(groups.items())}
    return out
