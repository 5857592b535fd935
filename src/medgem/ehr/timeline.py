"""A patient's record as a chronological timeline of compact text lines.

The "current state" sections (active problems, medications, allergies, latest value of each lab
series) are derived here once; every rendering and every budgeted context starts with them, so a
question about the present never depends on retrieval.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from medgem.inputs.fhir import ACTIVE_STATUSES, Event, Record

# Order of kinds on the same day: the visit first, then what happened in it.
_KIND_ORDER = {k: i for i, k in enumerate(
    ["encounter", "condition", "allergy", "lab", "vital", "observation", "report", "imaging", "procedure",
     "medication", "immunization", "careplan", "note"]
)}  # fmt: skip


@dataclass(frozen=True)
class Section:
    """A rendered block and the resources ("Type/id") whose facts it carries."""

    name: str
    text: str
    refs: frozenset[str]


@dataclass(frozen=True)
class LabSeries:
    """The latest result of one lab series, and how many results it has."""

    latest: Event
    count: int


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def value_text(e: Event) -> str:
    """'5.6 mmol/L (ref 3.5-5.1) H' for a measurement, the value text otherwise."""
    if e.value is None:
        return e.text
    out = f"{_num(e.value)} {e.unit}".strip()
    if e.low is not None or e.high is not None:
        out += f" (ref {_num(e.low)}-{_num(e.high)})"
    if e.flag and e.flag != "N":
        out += f" {e.flag}"
    return out


def event_line(e: Event) -> str:
    """One compact, dated line per event; notes keep their text on the following lines."""
    when = e.when or "undated"
    if e.kind in ("lab", "vital", "observation"):
        body = f"{e.name}: {value_text(e)}"
    elif e.kind == "medication":
        span = f"stopped {e.end}" if e.end else e.status
        body = f"started {e.name} {e.text}".strip() + f" [{span}]"
    elif e.kind == "condition":
        body = f"diagnosed {e.name}" + (f" [resolved {e.end}]" if e.end else f" [{e.status}]")
    elif e.kind == "allergy":
        body = f"allergy to {e.name}" + (f": {e.text}" if e.text else "")
    elif e.kind == "note":
        body = f"{e.name}:\n{e.text}" if e.text else e.name
    else:
        body = f"{e.name}" + (f": {e.text}" if e.text else "")
    return f"{when} {e.kind} {body}"


def _active(e: Event) -> bool:
    return not e.end and e.status in ACTIVE_STATUSES


class Timeline:
    """Sorted events plus the current-state views that are always shown."""

    def __init__(self, record: Record, as_of: str | None = None):
        self.record = record
        self.events = sorted(record.events, key=lambda e: (e.when, _KIND_ORDER.get(e.kind, 99), e.name))
        self.as_of = as_of or max((e.when for e in self.events), default="")

    def of_kind(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.kind in kinds]

    def active_problems(self) -> list[Event]:
        return [e for e in self.of_kind("condition") if _active(e)]

    def active_medications(self) -> list[Event]:
        return [e for e in self.of_kind("medication") if _active(e)]

    def allergies(self) -> list[Event]:
        return [e for e in self.of_kind("allergy") if e.status in ACTIVE_STATUSES]

    def lab_series(self) -> dict[str, LabSeries]:
        """Latest result per series (keyed by code, else name), in the order series first appear."""
        series: dict[str, list[Event]] = {}
        for e in self.of_kind("lab"):
            if e.value is not None or e.text:
                series.setdefault(e.code or e.name, []).append(e)
        return {key: LabSeries(events[-1], len(events)) for key, events in series.items()}

    def age(self) -> int | None:
        """Age in whole years at the last event (not today: records are read long after)."""
        born, last = self.record.patient.birth_date, self.as_of
        if len(born) < 10 or len(last) < 10:
            return None
        b, a = dt.date.fromisoformat(born), dt.date.fromisoformat(last)
        return a.year - b.year - ((a.month, a.day) < (b.month, b.day))

    def fixed_sections(self) -> list[Section]:
        """Demographics, active problems, medications, allergies, latest labs: always in a context."""
        p = self.record.patient
        age = self.age()
        age_text = "age 90 or older" if p.age_90_or_older else f"age {age}" if age is not None else ""
        who = ", ".join(x for x in (p.sex, age_text, f"born {p.birth_date}" if p.birth_date else "") if x)
        header = Section("patient", f"PATIENT: {who or 'unknown'}; record up to {self.as_of or 'unknown'}", frozenset())

        def listing(name: str, title: str, events: list[Event], fmt) -> Section:
            lines = [f"- {fmt(e)}" for e in events] or ["- none recorded"]
            return Section(name, f"{title}:\n" + "\n".join(lines), frozenset(e.ref for e in events))

        def med(e: Event) -> str:
            return f"{e.name} {e.text} (since {e.when or 'unknown'})".replace("  ", " ")

        labs = self.lab_series().values()
        return [
            header,
            listing("problems", "ACTIVE PROBLEMS", self.active_problems(), lambda e: f"{e.name} (since {e.when})"),
            listing("medications", "ACTIVE MEDICATIONS", self.active_medications(), med),
            listing("allergies", "ALLERGIES", self.allergies(), lambda e: f"{e.name}" + (f": {e.text}" if e.text else "")),
            Section(
                "labs",
                "LATEST LABS:\n" + ("\n".join(
                    f"- {s.latest.name}: {value_text(s.latest)} on {s.latest.when} ({s.count} results)" for s in labs
                ) or "- none recorded"),
                frozenset(s.latest.ref for s in labs),
            ),
        ]  # fmt: skip

    def render(self) -> str:
        """The whole record: current state, then every event in order."""
        fixed = "\n\n".join(s.text for s in self.fixed_sections())
        return fixed + "\n\nTIMELINE:\n" + "\n".join(event_line(e) for e in self.events)

    def summary(self) -> str:
        """Current state plus counts per kind and the span of the record: what `ehr summarize` prints."""
        counts = {}
        for e in self.events:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        first = next((e.when for e in self.events if e.when), "unknown")
        span = f"RECORD: {len(self.events)} entries from {first} to {self.as_of or 'unknown'}: " + ", ".join(
            f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
        )
        return "\n\n".join([*(s.text for s in self.fixed_sections()), span])
