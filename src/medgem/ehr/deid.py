"""De-identification of a patient record before it reaches logs, indexes or a model.

What is removed: the Patient resource's names, identifiers, telecoms and addresses (wherever they
appear, free text included), plus anything in free text that looks like a phone number, e-mail,
SSN or medical record number. Dates move by one offset per patient (seeded), chosen so that no
shifted date lands on an original one; intervals, order and ages stay true, except that a patient
aged 90 or older at the end of the record keeps only "90 or older" and no birth date (HIPAA Safe
Harbor: ages over 89 are identifying). Everything works on the
normalised `Record`, then renders as usual, so no code path sees the identifying text.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from dataclasses import replace

from medgem.inputs.fhir import PatientInfo, Record

_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_US = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
# Pattern rules for identifiers the Patient resource does not list. Order matters: SSN before phone.
_PATTERNS = [
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ID]"),
    (re.compile(r"(?:\+?1[-. ]?)?(?:\(\d{3}\)|\b\d{3})[-. ]?\d{3}[-. ]?\d{4}\b"), "[PHONE]"),
    (re.compile(r"\b(?:MRN|MR#|medical record (?:number|no\.?))[:#\s]*[A-Z0-9-]{4,}\b", re.I), "[ID]"),
    (re.compile(r"\b[A-Z]{2,4}-?\d{6,}\b"), "[ID]"),
]


def _parse(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def shift_date(value: str, days: int) -> str:
    """Shift an ISO date, keeping its precision ("2020", "2020-05" or "2020-05-17")."""
    if len(value) >= 10 and (day := _parse(value[:10])):
        return (day + dt.timedelta(days=days)).isoformat() + value[10:]
    if len(value) == 7 and (day := _parse(value + "-15")):
        return (day + dt.timedelta(days=days)).isoformat()[:7]
    if len(value) == 4 and value.isdigit():
        return str((dt.date(int(value), 7, 1) + dt.timedelta(days=days)).year)
    return value


def _dates_in(text: str) -> set[dt.date]:
    found = {_parse(f"{y}-{m}-{d}") for y, m, d in _ISO.findall(text)}
    found |= {_parse(f"{y}-{int(m):02d}-{int(d):02d}") for m, d, y in _US.findall(text)}
    return {d for d in found if d}


def record_dates(record: Record) -> set[dt.date]:
    """Every full date in a record: event dates, birth date, and dates written in free text."""
    dates = {_parse(x[:10]) for e in record.events for x in (e.when, e.end) if len(x) >= 10}
    dates.add(_parse(record.patient.birth_date[:10]) if len(record.patient.birth_date) >= 10 else None)
    for e in record.events:
        dates |= _dates_in(e.text)
    return {d for d in dates if d}


def date_offset(record: Record, seed: int) -> int:
    """Days to shift this patient's dates: seeded per patient, and never mapping a date onto another."""
    rng = random.Random(f"medgem-deid:{seed}:{record.patient.id}")
    dates = record_dates(record)
    offset = 0
    for _ in range(1000):
        offset = rng.choice((-1, 1)) * rng.randint(30, 730)
        if not any(d + dt.timedelta(days=offset) in dates for d in dates):
            break
    return offset


class Redactor:
    """Redacts one patient's identifying strings and the pattern rules, and shifts dates, in free text."""

    def __init__(self, patient: PatientInfo, offset: int):
        self.offset = offset
        rules: list[tuple[re.Pattern, str]] = []
        for values, label in ((patient.identifiers, "[ID]"), (patient.telecoms, "[CONTACT]"),
                              (patient.addresses, "[ADDRESS]"), (patient.names, "[NAME]")):  # fmt: skip
            for value in sorted(values, key=len, reverse=True):
                digits = re.sub(r"\D", "", value)
                if len(digits) >= 7 and len(digits) >= len(value) // 2:  # phones and numeric ids in any layout
                    pattern = r"\(?" + r"\D{0,3}".join(digits)
                else:
                    pattern = r"\s+".join(map(re.escape, value.split()))
                if len(value) >= 2:
                    rules.append((re.compile(rf"(?<!\w){pattern}(?!\w)", re.I), label))
        self.rules = rules + _PATTERNS

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for pattern, label in self.rules:
            text = pattern.sub(label, text)
        text = _ISO.sub(lambda m: shift_date(m.group(0), self.offset), text)
        return _US.sub(self._shift_us, text)

    def _shift_us(self, m: re.Match) -> str:
        day = _parse(f"{m.group(3)}-{int(m.group(1)):02d}-{int(m.group(2)):02d}")
        if day is None:
            return m.group(0)
        day += dt.timedelta(days=self.offset)
        return f"{day.month}/{day.day}/{day.year}"


def deidentify(record: Record, seed: int = 0) -> Record:
    """A copy of `record` with identifiers removed and dates shifted; `seed` picks the offsets."""
    offset = date_offset(record, seed)
    scrub = Redactor(record.patient, offset)
    events = [
        replace(e, when=shift_date(e.when, offset), end=shift_date(e.end, offset), name=scrub(e.name), text=scrub(e.text))
        for e in record.events
    ]
    old = _age_at_end(record) >= 90
    patient = PatientInfo(id="redacted", sex=record.patient.sex, age_90_or_older=old,
                          birth_date="" if old else shift_date(record.patient.birth_date, offset))
    return Record(patient, events, record.stats)


def _age_at_end(record: Record) -> int:
    """Whole years from birth to the record's last full date (-1 when either is unknown)."""
    born = _parse(record.patient.birth_date[:10])
    dates = [d for d in (_parse(e.when[:10]) for e in record.events) if d]
    if born is None or not dates:
        return -1
    end = max(dates)
    return end.year - born.year - ((end.month, end.day) < (born.month, born.day))
