"""De-identification of real test DICOMs: identifiers gone everywhere (dataset, summary, logs, CLI,
errors), UIDs remapped consistently, pixels untouched."""

from __future__ import annotations

import json
import logging
import warnings

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from medgem.errors import InputError
from medgem.inputs import deid
from medgem.inputs.deid import deidentify, safe_summary
from medgem.inputs.dicom import load_dicom, read_dicom

FILES = [
    "RG1_UNCR.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
    "US1_UNCR.dcm",
    "emri_small.dcm",
    "693_UNCR.dcm",
    "JPEG2000_UNC.dcm",
    "color3d_jpeg_baseline.dcm",
]
IDENTIFYING = [
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "OperatorsName",
    "PerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
]


def every_value(ds: Dataset) -> str:
    """All element values at every depth, file meta included, as one searchable text."""
    values: list[str] = []
    ds.walk(lambda _ds, elem: values.append(str(elem.value)) if elem.VR not in ("OB", "OW", "SQ") else None)
    values.extend(str(e.value) for e in getattr(ds, "file_meta", []))
    return "\n".join(values)


def secrets_of(ds: Dataset) -> set[str]:
    """The file's own identifying values long enough to search for (MR_small's test institution is
    'TOSHIBA', inside its Manufacturer 'TOSHIBA_MEC', which legitimately stays)."""
    found = {str(ds.get(k)) for k in IDENTIFYING if ds.get(k) not in (None, "")}
    return {v for v in found if len(v) >= 4 and v not in str(ds.get("Manufacturer"))}


def test_removal_lists_name_real_attributes():
    for keyword in deid._REMOVE | deid._BLANK | deid._IDENTIFIERS | deid._DESCRIPTORS:
        assert tag_for_keyword(keyword) is not None, keyword


@pytest.mark.parametrize("name", FILES)
def test_identifiers_are_gone_and_pixels_untouched(testfile, name):
    original = pydicom.dcmread(testfile(name))
    secrets = secrets_of(original)
    assert secrets, "the test file should carry identifiers to remove"
    before = original.PixelData
    clean = deidentify(original)
    text = every_value(clean)
    assert not [s for s in secrets if s in text]
    assert str(clean.get("PatientName")) == "" and str(clean.get("PatientID", "")) == ""
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.PixelData == before and original.PixelData is before
    assert str(original.PatientName) != "" or name == "emri_small.dcm"  # the input is left alone
    assert not any(elem.tag.is_private for elem in clean.iterall())
    assert clean.SOPClassUID == original.SOPClassUID
    assert clean.SOPInstanceUID != original.SOPInstanceUID
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_uids_map_consistently_across_slices_and_runs(testfile):
    a = pydicom.dcmread(testfile("MR_small.dcm"))
    b = pydicom.dcmread(testfile("MR_small.dcm"))
    b.SOPInstanceUID = pydicom.uid.generate_uid()
    clean_a, clean_b = deidentify(a), deidentify(b)
    assert clean_a.StudyInstanceUID == clean_b.StudyInstanceUID != a.StudyInstanceUID
    assert clean_a.SeriesInstanceUID == clean_b.SeriesInstanceUID
    assert clean_a.FrameOfReferenceUID == clean_b.FrameOfReferenceUID
    assert clean_a.SOPInstanceUID != clean_b.SOPInstanceUID
    assert clean_a.StudyInstanceUID.is_valid and len(clean_a.StudyInstanceUID) <= 64
    same = deidentify(a, uid_salt="site-secret").StudyInstanceUID
    assert same == deidentify(a, uid_salt="site-secret").StudyInstanceUID != clean_a.StudyInstanceUID


def test_dates_shift_by_whole_days_when_asked(testfile):
    ds = pydicom.dcmread(testfile("CT_small.dcm"))
    assert ds.StudyDate == "20040119"
    shifted = deidentify(ds, date_shift_days=-100)
    assert shifted.StudyDate == "20031011" and shifted.StudyTime == ds.StudyTime
    assert deidentify(ds).StudyDate == "" and deidentify(ds).StudyTime == ""


def test_nested_names_overlays_ae_titles_and_descriptors(testfile):
    ds = pydicom.dcmread(testfile("CT_small.dcm"))
    equipment = Dataset()
    equipment.InstitutionName = "St Elsewhere Hospital"
    equipment.OperatorsName = "Ehrlich^Victor"
    ds.ContributingEquipmentSequence = [equipment]
    ds.add_new(0x60000022, "LO", "overlay: Doe John")  # Overlay Description
    ds.RetrieveAETitle = "ELSEWHERE_PACS"
    ds.SeriesDescription = "CHEST CompressedSamples follow-up"  # quotes the patient's name
    ds.StudyDescription = "CT HEAD W/O CONTRAST"
    ds.ProtocolName = "Routine 20040119"
    clean = deidentify(ds)
    text = every_value(clean)
    for secret in ("St Elsewhere", "Ehrlich", "Doe John", "ELSEWHERE_PACS", "CompressedSamples", "20040119"):
        assert secret not in text
    assert "ContributingEquipmentSequence" in clean  # the sequence stays, its identifying items go
    assert "SeriesDescription" not in clean and "ProtocolName" not in clean
    assert clean.StudyDescription == "CT HEAD W/O CONTRAST"  # a clean descriptor is kept


def test_safe_summary_has_technical_facts_only(testfile, identifiers):
    summary = safe_summary(pydicom.dcmread(testfile("CT_small.dcm")))
    text = json.dumps(summary)  # plain JSON types only
    assert not [s for s in identifiers if s in text]
    assert summary["modality"] == "CT" and (summary["rows"], summary["columns"]) == (128, 128)
    assert summary["slice_thickness"] == 5 and summary["rescale_intercept"] == -1024
    assert summary["pixel_spacing"] == [0.661468, 0.661468] and summary["signed"] is True
    assert summary["transfer_syntax"] == "Explicit VR Little Endian" and summary["compressed"] is False
    assert summary["window_presets"] == ["abdomen", "bone", "brain", "lung", "mediastinum"]
    cr = safe_summary(read_dicom(testfile("RG1_J2KR.dcm"), pixels=False))
    assert cr["photometric"] == "MONOCHROME1" and cr["bits_stored"] == 15 and cr["compressed"] is True
    assert cr["body_part"] == "CHEST" and cr["window_center"] == 15000 and cr["window_presets"] == []
    enhanced = safe_summary(read_dicom(testfile("eCT_Supplemental.dcm"), pixels=False))
    assert enhanced["frames"] == 2 and enhanced["window_width"] == 102 and enhanced["slice_thickness"] == 10


def test_logs_and_warnings_carry_no_identifiers(testfile, patched_ct, caplog, capsys, identifiers):
    """pydicom validates values lazily and its warnings quote them; none may reach a log or stderr."""
    odd = patched_ct(
        {"InstanceNumber": ("12345678", "1 Secret"), "SliceThickness": ("5.00000000", "5mm Secret")},
    )
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        load_dicom(odd)
        assert safe_summary(read_dicom(odd))["slice_thickness"] is None  # malformed: not shown
        for name in FILES:
            load_dicom(testfile(name))
            safe_summary(read_dicom(testfile(name), pixels=False))
    shown = caplog.text + capsys.readouterr().err + "\n".join(str(w.message) for w in leaked)
    assert "withheld" in caplog.text  # pydicom did complain; only the fact was logged
    assert "Secret" not in shown
    assert not [s for s in identifiers if s in shown]


def test_malformed_numbers_are_errors_that_do_not_quote_them(patched_ct):
    odd = patched_ct({"RescaleSlope": ("1.0000001", "Doe Jane1")})
    with pytest.raises(InputError, match=r"^odd.dcm: the RescaleSlope header value is not a valid number$"):
        load_dicom(odd)
