"""FHIR R4 records -> validated, normalised patient events.

Reads a FHIR R4 Bundle (JSON) or Bulk Data `$export` NDJSON (one file, or a folder of `*.ndjson`).
Both are streamed: NDJSON line by line, Bundles entry by entry with ijson, and each resource is
validated alone with `fhir.resources` (its R4B models, which match R4 for every type read here) and
then reduced to a small `Event`. So memory grows with the number of events kept, never with the
size of the file or of the pydantic models.

An invalid resource raises `InputError` naming its resourceType, id and field, never the value (it
may be patient data). With `lenient=True` it is skipped and counted in `IngestStats` instead.
References to the resource types read here must resolve inside the record; references to other
types (Practitioner, Organization, Medication...) may point outside it, as FHIR allows.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ijson
from pydantic import ValidationError

from medgem.errors import InputError
from medgem.inputs.dicom import check_regular_file
from medgem.inputs.text import MAX_JSON_DEPTH, json_depth

log = logging.getLogger(__name__)

SUPPORTED = (
    "Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "MedicationStatement",
    "Procedure", "DiagnosticReport", "ImagingStudy", "AllergyIntolerance", "Immunization",
    "DocumentReference", "CarePlan",
)  # fmt: skip
NDJSON_SUFFIXES = (".ndjson", ".jsonl")
# Condition / allergy clinical statuses that still apply today.
ACTIVE_STATUSES = {"active", "recurrence", "relapse", "on-hold", "intended"}


@dataclass(frozen=True, slots=True)
class Event:
    """One dated fact from one resource, in the fields the timeline and QA need."""

    kind: str  # encounter, condition, lab, vital, observation, medication, procedure, report, imaging,
    #            allergy, immunization, note, careplan
    when: str  # ISO date, possibly partial ("2020", "2020-05"); "" when the resource has none
    name: str
    ref: str  # "Type/id" of the source resource
    code: str = ""  # "system|code" of the first coding: the key of a lab series
    status: str = ""
    value: float | None = None
    unit: str = ""
    low: float | None = None
    high: float | None = None
    flag: str = ""  # H / L / A from the interpretation, or computed from the reference range
    text: str = ""  # value text, dosage, reaction, conclusion or decoded note
    end: str = ""  # end or abatement date
    link: str = ""  # DICOM StudyInstanceUID of an ImagingStudy


@dataclass
class PatientInfo:
    """The Patient resource: demographics, plus the identifying strings that de-identification removes."""

    id: str
    sex: str = ""
    birth_date: str = ""
    names: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    telecoms: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    age_90_or_older: bool = False  # set by de-identification, which then drops the birth date (HIPAA)


@dataclass
class IngestStats:
    """What a read did: resources kept by type, skipped by reason (lenient), ignored by type."""

    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class Record:
    """One patient's record: who, what happened, and how reading it went."""

    patient: PatientInfo
    events: list[Event]
    stats: IngestStats


# --- reading -----------------------------------------------------------------------------------


def iter_raw(path: str | Path) -> Iterator[tuple[str, Any, str]]:
    """Yield (where, parsed resource, Bundle fullUrl or "") per resource, streaming.

    `where` locates the resource for error messages (file, line or entry); it never holds data.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(NDJSON_SUFFIXES))
        files = [p for p in found if p.is_file()]  # a FIFO would block the open forever
        if len(files) < len(found):
            log.warning("%d non-regular file(s) (pipes, sockets, devices) skipped", len(found) - len(files))
        if not files:
            raise InputError(f"{path.name}: folder holds no .ndjson files (expected a Bulk Data export)")
        for file in files:
            yield from _iter_ndjson(file)
    else:
        check_regular_file(path)
        yield from _iter_ndjson(path) if path.name.endswith(NDJSON_SUFFIXES) else _iter_bundle(path)


def _iter_ndjson(path: Path) -> Iterator[tuple[str, Any, str]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            if json_depth(line) > MAX_JSON_DEPTH:
                yield where, _NotJson(f"nested deeper than {MAX_JSON_DEPTH} levels"), ""
                continue
            try:
                yield where, json.loads(line), ""
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield where, _NotJson(str(exc).split(":")[0]), ""


def _check_depth(f: Any, name: str) -> None:
    """One streaming pass that refuses nesting past MAX_JSON_DEPTH: ijson's item builder costs memory with
    the square of the depth (a 200 KB file 100,000 deep grew past 22 GB)."""
    depth = 0
    for event, _ in ijson.basic_parse(f):
        if event in ("start_map", "start_array"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"{name}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif event in ("end_map", "end_array"):
            depth -= 1


@dataclass
class _NotJson:
    """A line that did not parse: passed on so lenient mode can count it like any bad resource."""

    reason: str


def _iter_bundle(path: Path) -> Iterator[tuple[str, Any, str]]:
    name = path.name
    try:
        with path.open("rb") as f:
            first = f.read(1).lstrip() or f.read(64).lstrip()[:1]
            if first not in (b"{", b"["):
                raise InputError(f"{name}: not JSON (a FHIR Bundle starts with '{{')")
            f.seek(0)
            _check_depth(f, name)
            f.seek(0)
            # resourceType normally comes first, so this reads only the file's head.
            kinds = ijson.items(f, "resourceType")
            kind = next(kinds, None)
        if kind is None:
            raise InputError(f"{name}: JSON but not FHIR (no top-level resourceType)")
        if kind != "Bundle":
            raise InputError(
                f"{name}: the top-level resourceType is not Bundle; expected a Bundle "
                "(name NDJSON files *.ndjson)"
            )
        with path.open("rb") as f:
            for index, entry in enumerate(ijson.items(f, "entry.item")):
                entry = entry if isinstance(entry, dict) else {}
                resource = entry.get("resource", _NotJson("entry has no resource"))
                full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else ""
                yield f"{name} entry {index}", resource, full_url
    except ijson.JSONError as exc:
        raise InputError(f"{name}: not JSON ({str(exc).splitlines()[0][:80]})") from None


# --- validation --------------------------------------------------------------------------------


def _model_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in SUPPORTED or "[" in str(item):  # pydantic's union-branch tags are not fields
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(resource)"


def _problem(exc: ValidationError) -> tuple[str, str]:
    """The first error's field path and reason, with the offending value scrubbed out."""
    err = exc.errors(include_url=False)[0]
    reason = err["msg"].removeprefix("Value error, ")
    value = str(err.get("input", ""))
    if value and len(value) > 2 and value in reason:
        reason = reason.replace(value, "<value>")
    reason = reason.splitlines()[0].strip()
    if err["type"] in ("datetime_from_date_parsing", "value_error") and "date" in reason.lower():
        reason = f"bad date ({reason})"
    return _field_path(err["loc"]), reason


class ResourceError(InputError):
    """One resource is invalid; carries what lenient mode counts."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def validate(where: str, raw: Any):
    """A validated fhir.resources model for one parsed resource, or ResourceError / None (ignored type)."""
    if isinstance(raw, _NotJson):
        raise ResourceError(f"{where}: not JSON ({raw.reason})", "not JSON")
    if not isinstance(raw, dict) or "resourceType" not in raw:
        raise ResourceError(f"{where}: JSON but not FHIR (no resourceType)", "not FHIR")
    kind = raw["resourceType"]
    rid = str(raw.get("id", "?"))[:64]
    try:
        cls = _model_class(str(kind))
    except (ValueError, TypeError):
        raise ResourceError(
            f"{where}: wrong resourceType {str(kind)[:40]!r} (not a FHIR R4 resource type)",
            "wrong resourceType",
        ) from None
    if kind not in SUPPORTED:
        return None
    try:
        model = cls.model_validate(raw)
    except ValidationError as exc:
        path, reason = _problem(exc)
        raise ResourceError(
            f"{where}: invalid {kind}/{rid}, field {path}: {reason}", reason.split(" (")[0]
        ) from None
    if kind == "DocumentReference":
        _check_attachments(raw, f"{where}: invalid {kind}/{rid}")
    return model


def _check_attachments(raw: dict, prefix: str) -> None:
    """Strict base64, and UTF-8 for text (pydantic silently drops characters outside the alphabet)."""
    for i, content in enumerate(raw.get("content") or []):
        attachment = content.get("attachment") or {}
        if attachment.get("data") is None:
            continue
        try:
            data = base64.b64decode(attachment["data"], validate=True)
            if str(attachment.get("contentType") or "text/plain").startswith("text/"):
                data.decode("utf-8")
        except (binascii.Error, ValueError, TypeError):
            raise ResourceError(
                f"{prefix}, field content[{i}].attachment.data: not valid base64 UTF-8 text", "bad attachment"
            ) from None


# --- normalisation -----------------------------------------------------------------------------


def _date(value: Any) -> str:
    """ISO date part of a FHIR date/dateTime/instant (already parsed by fhir.resources)."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)[:10]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _concept(cc: Any) -> tuple[str, str]:
    """(display text, "system|code") of a CodeableConcept."""
    if cc is None:
        return "", ""
    coding = (cc.coding or [None])[0]
    key = f"{coding.system or ''}|{coding.code or ''}" if coding else ""
    text = cc.text or (coding.display if coding and coding.display else "") or (coding.code if coding else "")
    return text or "", key


def _code(cc: Any) -> str:
    """The first code of a CodeableConcept (statuses, categories)."""
    return (cc.coding[0].code or "") if cc is not None and cc.coding else ""


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _ref(model) -> str:
    return f"{model.get_resource_type()}/{model.id}"


def _dosage(dosages: Any) -> tuple[str, str, str]:
    """(dosage text, bounds start, bounds end) of the first Dosage."""
    if not dosages:
        return "", "", ""
    dose = dosages[0]
    bounds = dose.timing.repeat.boundsPeriod if dose.timing and dose.timing.repeat else None
    start, end = (_date(bounds.start), _date(bounds.end)) if bounds else ("", "")
    return dose.text or "", start, end


def _medication(model) -> str:
    if model.medicationCodeableConcept is not None:
        return _concept(model.medicationCodeableConcept)[0]
    ref = model.medicationReference
    return (ref.display or ref.reference or "") if ref else ""


def _observation(m) -> Event:
    category = next((_code(c) for c in m.category or [] if _code(c)), "")
    kind = {"laboratory": "lab", "vital-signs": "vital"}.get(category, "observation")
    name, key = _concept(m.code)
    value, unit, text = None, "", ""
    if m.valueQuantity is not None:
        value, unit = _number(m.valueQuantity.value), m.valueQuantity.unit or m.valueQuantity.code or ""
    elif m.valueCodeableConcept is not None:
        text = _concept(m.valueCodeableConcept)[0]
    elif m.valueString is not None:
        text = m.valueString
    elif m.valueInteger is not None:
        value = float(m.valueInteger)
    elif m.valueBoolean is not None:
        text = "yes" if m.valueBoolean else "no"
    if m.component:
        text = ", ".join(
            f"{_concept(c.code)[0]} {_number(c.valueQuantity.value):g} {c.valueQuantity.unit or ''}".strip()
            for c in m.component
            if c.valueQuantity is not None and c.valueQuantity.value is not None
        )
    low = high = None
    if m.referenceRange:
        rr = m.referenceRange[0]
        low = _number(rr.low.value) if rr.low else None
        high = _number(rr.high.value) if rr.high else None
    flag = next((_code(i) for i in m.interpretation or [] if _code(i) in {"H", "L", "HH", "LL", "A"}), "")
    if not flag and value is not None:
        flag = "H" if high is not None and value > high else "L" if low is not None and value < low else ""
    when = _date(
        _first(m.effectiveDateTime, m.effectivePeriod.start if m.effectivePeriod else None, m.issued)
    )
    return Event(kind, when, name, _ref(m), key, m.status or "", value, unit, low, high, flag, text)


def _note(m) -> Event:
    texts = []
    for content in m.content or []:
        att = content.attachment
        if att.data is not None and (att.contentType or "text/plain").startswith("text/"):
            texts.append(att.data.decode("utf-8").strip())  # checked by _check_attachments
        elif att.url:
            texts.append(f"[{att.contentType or 'attachment'} at a URL, not fetched]")
    when = _date(_first(m.date, m.context.period.start if m.context and m.context.period else None))
    name = _concept(m.type)[0] or m.description or "note"
    return Event("note", when, name, _ref(m), status=m.status or "", text="\n".join(texts))


def to_event(m) -> Event | None:
    """Normalise one validated resource (Patient excepted) into an Event."""
    kind = m.get_resource_type()
    if kind == "Observation":
        return _observation(m)
    if kind == "DocumentReference":
        return _note(m)
    if kind == "Encounter":
        name = _concept((m.type or [None])[0])[0] or (m.class_fhir.display or m.class_fhir.code or "")
        reason = "; ".join(_concept(r)[0] for r in m.reasonCode or [])
        start, end = (_date(m.period.start), _date(m.period.end)) if m.period else ("", "")
        return Event(
            "encounter", start, name or "encounter", _ref(m), status=m.status or "", text=reason, end=end
        )
    if kind == "Condition":
        name, key = _concept(m.code)
        onset = _first(m.onsetDateTime, m.onsetPeriod.start if m.onsetPeriod else None, m.recordedDate)
        abated = _first(m.abatementDateTime, m.abatementPeriod.end if m.abatementPeriod else None)
        status = _code(m.clinicalStatus) or ("resolved" if abated else "active")
        return Event("condition", _date(onset), name, _ref(m), key, status, end=_date(abated))
    if kind in ("MedicationRequest", "MedicationStatement"):
        dosage, start, end = _dosage(m.dosageInstruction if kind == "MedicationRequest" else m.dosage)
        if kind == "MedicationRequest":
            when = _date(m.authoredOn) or start
        else:
            period = m.effectivePeriod
            when = (
                _date(_first(m.effectiveDateTime, period.start if period else None, m.dateAsserted)) or start
            )
            end = _date(period.end) if period and period.end else end
        return Event("medication", when, _medication(m), _ref(m), status=m.status or "", text=dosage, end=end)
    if kind == "Procedure":
        name, key = _concept(m.code)
        when = _first(m.performedDateTime, m.performedPeriod.start if m.performedPeriod else None)
        return Event("procedure", _date(when), name, _ref(m), key, m.status or "")
    if kind == "DiagnosticReport":
        name, key = _concept(m.code)
        when = _first(m.effectiveDateTime, m.effectivePeriod.start if m.effectivePeriod else None, m.issued)
        return Event("report", _date(when), name, _ref(m), key, m.status or "", text=m.conclusion or "")
    if kind == "ImagingStudy":
        modalities = "/".join(c.code for c in m.modality or [] if c.code)
        name = m.description or _concept((m.procedureCode or [None])[0])[0] or f"{modalities} study"
        detail = ", ".join(
            x for x in (modalities, f"{m.numberOfSeries} series" if m.numberOfSeries else "") if x
        )
        uid = next((i.value[8:] for i in m.identifier or [] if (i.value or "").startswith("urn:oid:")), "")
        return Event("imaging", _date(m.started), name, _ref(m), status=m.status or "", text=detail, link=uid)
    if kind == "AllergyIntolerance":
        name, key = _concept(m.code)
        reactions = [_concept(x)[0] for r in m.reaction or [] for x in r.manifestation or []]
        detail = "; ".join(
            x for x in ("reaction " + ", ".join(reactions) if reactions else "", m.criticality or "") if x
        )
        when = _first(m.onsetDateTime, m.recordedDate)
        return Event(
            "allergy", _date(when), name, _ref(m), key, _code(m.clinicalStatus) or "active", text=detail
        )
    if kind == "Immunization":
        name, key = _concept(m.vaccineCode)
        return Event("immunization", _date(m.occurrenceDateTime), name, _ref(m), key, m.status or "")
    if kind == "CarePlan":
        name = m.title or _concept((m.category or [None])[0])[0] or "care plan"
        activities = "; ".join(
            a.detail.description or _concept(a.detail.code)[0]
            for a in m.activity or []
            if a.detail is not None
        )
        detail = " ".join(x for x in (m.description or "", activities) if x)
        start, end = (_date(m.period.start), _date(m.period.end)) if m.period else ("", "")
        return Event(
            "careplan", start or _date(m.created), name, _ref(m), status=m.status or "", text=detail, end=end
        )
    return None


def _patient(m) -> PatientInfo:
    names = []
    for n in m.name or []:
        names += [
            n.text or "",
            " ".join([*(n.given or []), n.family or ""]).strip(),
            n.family or "",
            *(n.given or []),
        ]
    addresses = []
    for a in m.address or []:
        addresses += [a.text or "", *(a.line or []), a.city or "", a.postalCode or ""]
    return PatientInfo(
        id=m.id or "",
        sex=m.gender or "",
        birth_date=_date(m.birthDate),
        names=[x for x in dict.fromkeys(names) if x],
        identifiers=[i.value for i in m.identifier or [] if i.value],
        telecoms=[t.value for t in m.telecom or [] if t.value],
        addresses=[x for x in dict.fromkeys(addresses) if x],
    )


# --- references --------------------------------------------------------------------------------

# Relative ("Patient/1"), absolute (".../Patient/1", optionally versioned), urn:uuid / urn:oid, contained.
_REF = re.compile(
    r"^(?:urn:uuid:[0-9a-fA-F-]{36}|urn:oid:[0-9.]+|#.*|(?:.*/)?([A-Z][A-Za-z]+)/[A-Za-z0-9.-]{1,64}(?:/_history/.*)?)$"
)


def _references(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, reference) of every reference in a raw resource, contained resources aside."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _references(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield path, node["reference"]
        for key, value in node.items():
            if isinstance(value, dict | list) and key != "contained":
                yield from _references(value, f"{path}.{key}" if path else key)


def _subject(raw: dict) -> str:
    """The patient reference of a raw resource (subject or patient), "" when it has none."""
    ref = raw.get("subject") or raw.get("patient") or {}
    return ref.get("reference", "") if isinstance(ref, dict) else ""


def _tail(reference: str) -> str:
    """ "Type/id" of an absolute or relative reference URL."""
    return "/".join(reference.split("/_history/")[0].split("/")[-2:])


def _same(reference: str, patient_id: str) -> bool:
    """Whether a reference names this patient, in any of the forms a server or Bundle uses."""
    return reference == f"Patient/{patient_id}" or reference.endswith(
        (f"/Patient/{patient_id}", f":{patient_id}")
    )


def _check_references(
    pending: list[tuple[str, str, str, str]], aliases: dict[str, str], lenient: bool
) -> set[str]:
    """The resources whose references are malformed or do not resolve (lenient), else raise on the first."""
    broken: set[str] = set()
    for where, source, field_path, target in pending:
        match = _REF.match(target)
        if match is None:
            problem = "malformed reference"
        elif target.startswith("#") or target in aliases or _tail(target) in aliases:
            continue
        elif match.group(1) and match.group(1) not in SUPPORTED:
            continue  # a type we do not read (Practitioner, Medication...) may live outside the record
        else:
            problem = "broken reference"
        if not lenient:
            raise InputError(f"{where}: invalid {source}, field {field_path}: {problem} {target[:80]!r}")
        broken.add(source)
    return broken


# --- the record --------------------------------------------------------------------------------


def load_record(path: str | Path, *, lenient: bool = False, patient_id: str | None = None) -> Record:
    """Read one patient's record, validating every resource and every internal reference.

    A file holding several patients (a Bulk Data export) needs `patient_id`; only that patient's
    resources are normalised and kept, so memory follows one patient, not the file.
    """
    stats = IngestStats()
    patients: dict[str, PatientInfo] = {}
    events: list[tuple[str, Event]] = []  # (subject reference, event)
    pending: list[tuple[str, str, str, str]] = []  # (where, "Type/id", field path, reference)
    aliases: dict[str, str] = {}  # "Type/id" and Bundle fullUrls -> "Type/id"
    for where, raw, full_url in iter_raw(path):
        try:
            model = validate(where, raw)
            key = f"{raw['resourceType']}/{raw.get('id')}"
            aliases[key] = aliases[full_url or key] = key
            if model is None:
                stats.ignored[raw["resourceType"]] += 1
                continue
            if raw["resourceType"] == "Patient":
                if patient_id in (None, model.id):
                    patients[key] = _patient(model)
                stats.kept["Patient"] += 1
                continue
            subject = _subject(raw)
            if patient_id is not None and subject and not _same(subject, patient_id):
                continue
            event = to_event(model)
        except ResourceError as exc:
            if not lenient:
                raise
            stats.skipped[exc.reason] += 1
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):  # it exists, though invalid: not "broken"
                key = f"{raw.get('resourceType')}/{raw['id']}"
                aliases[key] = aliases[full_url or key] = key
            continue
        pending.extend((where, key, field_path, target) for field_path, target in _references(raw))
        events.append((subject, event))
        stats.kept[raw["resourceType"]] += 1
    broken = _check_references(pending, aliases, lenient)
    patient = _choose_patient(patients, patient_id, Path(path).name)
    mine = f"Patient/{patient.id}"
    kept = []
    for subject, event in events:
        if event.ref in broken:
            stats.kept[event.ref.split("/")[0]] -= 1
            stats.skipped["broken reference"] += 1
        elif not subject or aliases.get(subject, _tail(subject)) == mine:
            kept.append(event)
    log.info(
        "read %d events (%d skipped, %d ignored)", len(kept), stats.total_skipped, sum(stats.ignored.values())
    )
    return Record(patient, kept, stats)


def _choose_patient(patients: dict[str, PatientInfo], patient_id: str | None, name: str) -> PatientInfo:
    if patient_id is not None and not patients:
        raise InputError(f"{name}: no Patient with the requested id")
    if not patients:
        raise InputError(f"{name}: no Patient resource, so no record to build")
    if len(patients) > 1:
        raise InputError(f"{name}: holds {len(patients)} patients; choose one with --patient ID")
    return next(iter(patients.values()))
