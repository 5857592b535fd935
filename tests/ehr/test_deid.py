"""De-identification: for every synthetic patient, no name, identifier, phone, e-mail, address or
original date reaches the rendered context, the logs or an error message; dates shift consistently."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging

import pytest

from medgem.ehr.context import ContextBuilder
from medgem.ehr.deid import Redactor, date_offset, deidentify, record_dates
from medgem.ehr.timeline import Timeline
from medgem.errors import InputError
from medgem.inputs.fhir import PatientInfo, load_record


def _forbidden(patient, record) -> list[str]:
    """Every identifying string of this patient, and every original date in ISO and US forms."""
    ids = patient.facts["identifiers"]
    strings = [*ids["names"], *ids["ids"], *ids["phones"], *ids["emails"], *ids["addresses"]]
    strings += [p.replace("(", "").replace(") ", "-") for p in ids["phones"]]  # 555-123-4567 layout too
    for day in record_dates(record):
        strings += [day.isoformat(), f"{day.month}/{day.day}/{day.year}"]
    return strings


def test_nothing_identifying_survives_for_any_patient(patients, bundle_files, count_tokens, caplog):
    caplog.set_level(logging.DEBUG)
    for p, path in zip(patients, bundle_files, strict=True):
        record = load_record(path)
        forbidden = _forbidden(p, record)
        clean = deidentify(record, seed=3)
        timeline = Timeline(clean)
        builder = ContextBuilder(timeline, count_tokens)
        shown = [timeline.render(), timeline.summary()]
        shown += [builder.build(q["question"], 1500).text for q in p.qa]
        text = "\n".join(shown)
        assert "[NAME]" in text or not timeline.of_kind("note")
        leaks = [s for s in forbidden if s in text]
        assert not leaks, f"patient {p.id}: {len(leaks)} identifying strings survive"
    assert not [s for p in patients for s in p.facts["identifiers"]["names"] if s in caplog.text]


def test_error_messages_hold_no_identifiers(patients, tmp_path):
    for p in patients[:10]:
        data = copy.deepcopy(p.bundle)
        patient = data["entry"][0]["resource"]
        patient["telecom"][0]["value"] = {"not": "a string"}  # invalid field on the Patient itself
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        with pytest.raises(InputError) as info:
            load_record(path)
        message = str(info.value)
        assert "telecom[0].value" in message
        assert not [s for s in _forbidden(p, load_record_safe(p, tmp_path)) if s in message]


def load_record_safe(p, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(p.bundle))
    return load_record(path)


def test_dates_shift_by_one_offset_per_patient_deterministically(records):
    for record in records[:10]:
        a, b = deidentify(record, seed=1), deidentify(record, seed=1)
        assert a.events == b.events
        offset = date_offset(record, seed=1)
        assert 30 <= abs(offset) <= 730
        for before, after in zip(record.events, a.events, strict=True):
            if len(before.when) == 10:
                assert dt.date.fromisoformat(after.when) - dt.date.fromisoformat(before.when) == dt.timedelta(offset)
            assert (before.kind, before.value, before.unit, before.ref) == (after.kind, after.value, after.unit, after.ref)
        born = dt.date.fromisoformat(a.patient.birth_date)
        assert born - dt.date.fromisoformat(record.patient.birth_date) == dt.timedelta(offset)
        assert Timeline(a).age() == Timeline(record).age()  # intervals, hence ages, stay true
        assert a.patient.names == a.patient.identifiers == a.patient.telecoms == a.patient.addresses == []
    offsets = {date_offset(records[0], seed=s) for s in range(10)}
    assert len(offsets) > 5


def test_pattern_rules_catch_identifiers_the_patient_resource_does_not_list():
    redact = Redactor(PatientInfo(id="x", names=["Ada Quist", "Quist", "Ada"]), offset=10)
    text = (
        "Ada Quist called from 555-201-3344 (alt +1 (555) 201-9999), wrote ada.q@mail.example.org; SSN 123-45-6789, "
        "MRN: 88A1234, chart ZX12345678. Seen 3/4/2021 and on 2021-03-04; MS QUIST agreed."
    )
    out = redact(text)
    for secret in ("Ada", "QUIST", "555", "mail.example", "123-45-6789", "88A1234", "ZX12345678", "3/4/2021",
                   "2021-03-04"):  # fmt: skip
        assert secret.lower() not in out.lower(), secret
    assert "3/14/2021" in out and "2021-03-14" in out and "[EMAIL]" in out and "[PHONE]" in out


def test_ages_over_89_become_90_or_older_without_a_birth_date(records):
    """HIPAA Safe Harbor: an age over 89 is identifying, so only the category survives."""
    record = copy.deepcopy(records[0])
    last = max(e.when[:10] for e in record.events if len(e.when) >= 10)
    record.patient.birth_date = f"{int(last[:4]) - 97}{last[4:10]}"
    clean = deidentify(record, seed=3)
    assert clean.patient.birth_date == "" and clean.patient.age_90_or_older
    header = Timeline(clean).fixed_sections()[0].text
    assert "age 90 or older" in header and "born" not in header and "97" not in header
    record.patient.birth_date = f"{int(last[:4]) - 89}{last[4:10]}"  # 89 today: kept, shifted
    assert not deidentify(record, seed=3).patient.age_90_or_older
    assert "age 89" in Timeline(deidentify(record, seed=3)).fixed_sections()[0].text
