"""FHIR ingestion: synthetic bundles validate and read back to the generator's ground truth; Bulk
NDJSON reads the same and streams; every kind of bad input is a clear error or a lenient count."""

from __future__ import annotations

import base64
import copy
import json
import tracemalloc
from collections import Counter

import pytest
from fhir.resources.R4B import get_fhir_model_class

from medgem.ehr.synth import LABS, generate
from medgem.ehr.timeline import Timeline
from medgem.errors import InputError
from medgem.inputs.fhir import load_record


def test_fifty_bundles_validate_with_fhir_resources(patients):
    assert len(patients) == 50
    for p in patients:
        bundle = get_fhir_model_class("Bundle").model_validate(p.bundle)  # the whole Bundle, by the library alone
        assert len(bundle.entry) == sum(p.facts["counts"].values())


def test_read_counts_equal_generator_counts(patients, records):
    for p, record in zip(patients, records, strict=True):
        counts = dict(p.facts["counts"])
        assert record.stats.ignored == Counter({"Practitioner": counts.pop("Practitioner")})
        assert dict(record.stats.kept) == counts
        assert record.stats.total_skipped == 0
        assert len(record.events) == sum(counts.values()) - 1  # every resource but the Patient is an event


def test_timeline_facts_equal_ground_truth(patients, records):
    for p, record in zip(patients, records, strict=True):
        t = Timeline(record)
        facts = p.facts
        assert record.patient.birth_date == facts["birth_date"] and record.patient.sex == facts["sex"]
        assert t.age() <= facts["age"]  # age at the last event, not at the generator's as-of date
        series = {s.latest.name: s for s in t.lab_series().values()}
        assert set(series) == {LABS[k].name for k in facts["labs"]}
        for key, results in facts["labs"].items():
            s = series[LABS[key].name]
            assert s.count == len(results)
            last = results[-1]
            assert (s.latest.value, s.latest.unit, s.latest.when, s.latest.ref) == (
                last["value"], last["unit"], last["date"], last["ref"])  # fmt: skip
            assert s.latest.low == LABS[key].low and s.latest.high == LABS[key].high
            hba1c = [e.value for e in t.of_kind("lab") if e.name == LABS[key].name]
            assert hba1c == [r["value"] for r in results]  # chronological order preserved
        assert {e.name for e in t.active_problems()} == {x["name"] for x in facts["problems"] if x["active"]}
        assert {(e.name, e.when) for e in t.active_medications()} == {
            (m["drug"], m["start"]) for m in facts["medications"] if not m["end"]}  # fmt: skip
        meds = {e.ref: e for e in t.of_kind("medication")}
        for m in facts["medications"]:
            assert (meds[m["ref"]].when, meds[m["ref"]].end) == (m["start"], m["end"])
        assert {e.name for e in t.allergies()} == {a["substance"] for a in facts["allergies"]}
        imaging = {e.ref: e for e in t.of_kind("imaging")}
        assert {(i["ref"], i["date"], i["uid"]) for i in facts["imaging"]} == {
            (r, e.when, e.link) for r, e in imaging.items()}  # fmt: skip
        notes = t.of_kind("note")
        assert len(notes) == facts["counts"].get("DocumentReference", 0)
        assert all(n.text.startswith("Progress note.") for n in notes)  # base64 attachment decoded
        dates = [e.when for e in t.events]
        assert dates == sorted(dates)


def test_bulk_ndjson_reads_like_the_bundle(tmp_path, seed, write_bulk):
    relative = generate(4, seed, ref_style="relative")
    folder = write_bulk(relative, tmp_path / "export")
    with pytest.raises(InputError, match="holds 4 patients; choose one with --patient"):
        load_record(folder)
    for p in relative:
        bundle_file = tmp_path / f"{p.id}.json"
        bundle_file.write_text(json.dumps(p.bundle))
        from_bundle, from_bulk = load_record(bundle_file), load_record(folder, patient_id=p.id)
        assert sorted(from_bulk.events, key=lambda e: e.ref) == sorted(from_bundle.events, key=lambda e: e.ref)
        assert from_bulk.patient == from_bundle.patient
    observations = tmp_path / "Observation.ndjson"  # an export without its Patient file
    observations.write_text((folder / "Observation.ndjson").read_text())
    with pytest.raises(InputError, match="field subject: broken reference"):
        load_record(observations)
    practitioners = tmp_path / "Practitioner.ndjson"
    practitioners.write_text((folder / "Practitioner.ndjson").read_text())
    with pytest.raises(InputError, match="no Patient resource"):
        load_record(practitioners)
    with pytest.raises(InputError, match="no Patient with the requested id"):
        load_record(folder, patient_id="no-such-patient")


def test_ndjson_streams_with_memory_far_below_file_size(tmp_path, seed):
    many = generate(30, seed + 1, ref_style="relative")
    path = tmp_path / "export.ndjson"
    with path.open("w") as f:
        for p in many:
            for entry in p.bundle["entry"]:
                f.write(json.dumps(entry["resource"]) + "\n")
    size = path.stat().st_size
    resources = sum(len(p.bundle["entry"]) for p in many)
    tracemalloc.start()
    record = load_record(path, patient_id=many[-1].id)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert resources > 3_000 and size > 2_000_000
    assert record.patient.id == many[-1].id and len(record.events) == len(many[-1].bundle["entry"]) - 2
    assert peak < size / 3, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def bundle(patients):
    """A mutable copy of one patient's Bundle, and a writer for it."""
    data = copy.deepcopy(patients[0].bundle)

    def write(tmp_path, content=None):
        path = tmp_path / "bundle.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content or data))
        return path

    return data, write


def _first(data, kind):
    return next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == kind)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("this is not json", "not JSON"),
        ("", "not JSON"),
        ('{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "a"', "not JSON"),
        ('{"hello": "world"}', "JSON but not FHIR"),
        ("[1, 2, 3]", "JSON but not FHIR"),
        ('{"resourceType": "Patient", "id": "p1"}', "the top-level resourceType is not Bundle; expected a Bundle"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "record.json"
    path.write_text(content)
    for lenient in (False, True):  # nothing to read: lenient cannot help
        with pytest.raises(InputError, match=message):
            load_record(path, lenient=lenient)


def _corrupt_date(data):
    obs = _first(data, "Observation")
    obs["effectiveDateTime"] = "2021-13-45T10:00:00Z"
    return f"Observation/{obs['id']}, field effectiveDateTime: bad date", "bad date"


def _wrong_type(data):
    data["entry"][3]["resource"]["resourceType"] = "Obsrvation"
    return "entry 3: wrong resourceType 'Obsrvation' \\(not a FHIR R4 resource type\\)", "wrong resourceType"


def _broken_reference(data):
    obs = _first(data, "Observation")
    obs["subject"] = {"reference": "urn:uuid:00000000-0000-4000-8000-000000000000"}
    return f"Observation/{obs['id']}, field subject: broken reference", "broken reference"


def _malformed_reference(data):
    cond = _first(data, "Condition")
    cond["subject"] = {"reference": "not a reference at all"}
    return f"Condition/{cond['id']}, field subject: malformed reference", "broken reference"


def _missing_field(data):
    cond = _first(data, "Condition")
    del cond["subject"]
    return f"Condition/{cond['id']}, field subject: Field required", "Field required"


def _not_fhir_entry(data):
    data["entry"].append({"resource": {"some": "thing"}})
    return f"entry {len(data['entry']) - 1}: JSON but not FHIR", "not FHIR"


def _bad_attachment(data):
    doc = next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] in ("DocumentReference",))
    doc["content"][0]["attachment"]["data"] = "@@@@"  # pydantic quietly decodes this to b""
    return f"DocumentReference/{doc['id']}, field content\\[0\\].attachment.data: not valid base64", "bad attachment"


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_date, _wrong_type, _broken_reference, _malformed_reference, _missing_field, _not_fhir_entry,
     _bad_attachment],
)  # fmt: skip
def test_bad_resources_name_type_id_field_or_are_counted(tmp_path, patients, records, corrupt):
    index = next(i for i, p in enumerate(patients) if p.facts["counts"].get("DocumentReference"))
    data = copy.deepcopy(patients[index].bundle)
    message, reason = corrupt(data)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        load_record(path)
    record = load_record(path, lenient=True)
    assert record.stats.skipped == Counter({reason: 1})
    dropped = {e.ref for e in records[index].events} - {e.ref for e in record.events}
    assert len(dropped) == (reason != "not FHIR") and len(record.events) == len(records[index].events) - len(dropped)


def test_error_messages_never_quote_the_bad_value(tmp_path, bundle):
    data, write = bundle
    patient = _first(data, "Patient")
    patient["birthDate"] = "1948-02-31-secret"
    with pytest.raises(InputError) as info:
        load_record(write(tmp_path))
    assert "birthDate" in str(info.value) and "secret" not in str(info.value) and "1948" not in str(info.value)


def test_ndjson_bad_lines_are_named_or_counted(tmp_path, seed):
    [p] = generate(1, seed, ref_style="relative")
    lines = [json.dumps(e["resource"]) for e in p.bundle["entry"]]
    lines.insert(4, "{not json")
    path = tmp_path / "export.ndjson"
    path.write_text("\n".join(lines) + "\n\n")
    with pytest.raises(InputError, match="export.ndjson line 5: not JSON"):
        load_record(path)
    record = load_record(path, lenient=True)
    assert record.stats.skipped == Counter({"not JSON": 1})
    assert len(record.events) == len(p.bundle["entry"]) - 2


def test_missing_paths_and_empty_export_folders(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_record(tmp_path / "absent.json")
    with pytest.raises(InputError, match="holds no .ndjson files"):
        load_record(tmp_path)


def test_note_attachments_decode_utf8(tmp_path, bundle):
    data, write = bundle
    doc = {"resourceType": "DocumentReference", "id": "note-1", "status": "current",
           "subject": {"reference": data["entry"][0]["fullUrl"]}, "date": "2023-01-02T10:00:00Z",
           "content": [{"attachment": {"contentType": "text/plain",
                                       "data": base64.b64encode("Fièvre à 39 °C".encode()).decode()}}]}  # fmt: skip
    data["entry"].append({"fullUrl": "urn:uuid:7f1d2c0e-1111-4222-8333-944455556666", "resource": doc})
    notes = [e for e in load_record(write(tmp_path)).events if e.ref == "DocumentReference/note-1"]
    assert notes[0].text == "Fièvre à 39 °C" and notes[0].when == "2023-01-02"
    doc["content"][0]["attachment"]["data"] = base64.b64encode(b"\xff\xfe bad").decode()
    with pytest.raises(InputError, match="DocumentReference/note-1, field content\\[0\\].attachment.data"):
        load_record(write(tmp_path))
