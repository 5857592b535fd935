"""Lab reports -> FHIR Observations: a reportlab PDF renders to page images and has a text layer; a
scripted stand-in model (only for the harness arithmetic) gives Observations that fhir.resources
validates; bad input is one line; the embedded model runs the command end to end."""

from __future__ import annotations

import json

import pytest

from medgem.ehr.extract import LAB_SCHEMA, extract_labs, loinc_for, parse_answer, validate_observation
from medgem.ehr.synth import lab_report, make_patient
from medgem.errors import InputError
from medgem.inputs.documents import read_document


def _pdf(path, text: str) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    page = canvas.Canvas(str(path), pagesize=A4)
    y = 800
    for line in text.splitlines():
        page.setFont("Courier", 10)
        page.drawString(40, y, line)
        y -= 14
    page.showPage()
    page.save()


@pytest.fixture
def report(tmp_path):
    text, rows = lab_report(make_patient(11, 0).facts)
    (tmp_path / "report.txt").write_text(text)
    _pdf(tmp_path / "report.pdf", text)
    return tmp_path, text, rows


def test_a_pdf_report_renders_to_page_images_and_has_its_text(report):
    folder, text, rows = report
    doc = read_document(folder / "report.pdf")
    assert doc.kind == "pdf" and doc.page_count == 1 and len(doc.pages) == 1
    page = doc.pages[0]
    assert page.size == (1191, 1684) and page.mode == "RGB"
    assert page.convert("L").getextrema()[0] < 64  # dark text on the white page
    for row in rows:
        assert row["name"] in doc.text and f"{row['value']:g}" in doc.text


def test_a_scripted_answer_becomes_valid_fhir_observations(report, scripted_pipe):
    """A stand-in that writes the report's true values, for the harness arithmetic only (the real-model
    run is the test below and `medgem ehr extract` in BENCHMARKS.md)."""
    from fhir.resources.R4B import get_fhir_model_class

    from medgem.ehr.extract import prompt_for

    folder, _, rows = report
    items = [{"name": r["name"], "value": r["value"], "unit": r["unit"],
              "reference_range": {"low": r["low"], "high": r["high"]}, "date": r["date"]} for r in rows]
    # Keys in sorted order: the schema is canonicalised with sorted keys (engine/constraints.py), so the
    # grammar asks for them so.
    answer = json.dumps({"observations": items}, separators=(", ", ": "), sort_keys=True)
    import jsonschema

    jsonschema.validate(json.loads(answer), LAB_SCHEMA)
    prompt = prompt_for(read_document(folder / "report.txt"), False, False)[0]
    result = extract_labs(scripted_pipe(prompt, answer), folder / "report.txt", subject="Patient/p1")
    assert result.source == "text" and not result.notes and len(result.observations) == len(rows)
    bundle = get_fhir_model_class("Bundle").model_validate(result.bundle())
    assert len(bundle.entry) == len(rows)
    for obs, row in zip(result.observations, rows):
        assert validate_observation(obs) is None
        assert obs["valueQuantity"] == {"value": row["value"], "unit": row["unit"]}
        assert obs["code"]["coding"][0]["code"] == loinc_for(row["name"])[0]
        assert obs["effectiveDateTime"] == row["date"] and obs["subject"] == {"reference": "Patient/p1"}


def test_cut_off_and_jsonless_answers():
    item = '{"name": "Sodium", "value": 140, "unit": "mmol/L", "reference_range": {"low": 135, "high": 145}, "date": "2024-01-02"}'
    assert parse_answer('{"observations": [' + item + ", " + item[:30]) == ([json.loads(item)], False)
    assert parse_answer("no JSON here") == ([], False)
    assert parse_answer('{"observations": []}') == ([], True)


def test_an_impossible_date_is_refused_by_fhir():
    from medgem.ehr.extract import to_observation

    obs = to_observation({"name": "Sodium", "value": 1, "unit": "mmol/L", "date": "2024-13-45"})
    assert "effectiveDateTime" in validate_observation(obs)


def test_loinc_only_from_the_table():
    assert loinc_for("  Potassium: ") == ("2823-3", "Potassium") and loinc_for("HbA1c")[0] == "4548-4"
    assert loinc_for("BUN")[0] == "3094-0" and loinc_for("potassium-ish") is None


def test_bad_documents_are_one_line_errors(tmp_path):
    import pypdfium2 as pdfium

    empty = pdfium.PdfDocument.new()
    empty.save(str(tmp_path / "empty.pdf"))
    (tmp_path / "fake.pdf").write_bytes(b"%PDF-1.7\nnot really")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    # PDFium refuses a page-less PDF at load (pypdfium2 5.15), so that one reads "not a readable PDF".
    for name, message in [("empty.pdf", "has no pages|not a readable PDF"), ("fake.pdf", "not a readable PDF"),
                          ("binary.bin", "not a PDF, a PNG/JPEG page or UTF-8 text"), ("missing.pdf", "no such file")]:
        with pytest.raises(InputError, match=message) as info:
            read_document(tmp_path / name)
        assert "\n" not in str(info.value)


def test_the_command_runs_on_the_embedded_model(report, run_cli):
    folder, _, _ = report
    code, out, err = run_cli("ehr", "extract", folder / "report.pdf", "--max-new-tokens", "24",
                             "--out", folder / "out.json")
    assert code == 0, err
    assert "text-only: read the PDF's text layer" in err and "observation(s) from the pdf text layer" in err
    bundle = json.loads((folder / "out.json").read_text())
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class("Bundle").model_validate(bundle)
    code, _, err = run_cli("ehr", "extract", folder / "nothing.pdf")
    assert code == 2 and "no such file" in err
