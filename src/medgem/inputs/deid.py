"""DICOM header de-identification in the spirit of the PS3.15 Annex E Basic Confidentiality Profile.

What happens to a copy of the dataset (pixels are never touched; burned-in text stays, which is why
the summary reports BurnedInAnnotation):
- every person name (any PN element, at any depth) is removed; the type 2 attributes of `_BLANK`
  (PatientName, PatientID, PatientBirthDate, PatientSex, ReferringPhysicianName, AccessionNumber,
  StudyID) stay present but empty, as the profile's "Z" action asks;
- patient IDs, accession and study numbers, device serials, institution name/address/department,
  addresses, phone numbers, free-text comments and the other attributes in `_REMOVE` are removed;
- dates and times (DA, DT, TM) are blanked, or dates shifted by a fixed number of days when the
  caller keeps intervals for longitudinal work;
- instance UIDs are replaced by UIDs hashed from the original and a per-process secret, so
  every slice of a series maps to the same new Study/Series/Frame of Reference UID within one run but
  the originals cannot be looked up; registered UIDs (SOP classes, transfer syntaxes) are kept;
- private tags, AE titles, curves (50xx) and overlays (60xx, which may hold burned text) are removed;
- Study/Series Description and Protocol Name are kept only when they quote none of the dataset's own
  names, IDs or dates and hold no long digit run (a cautious form of the Clean Descriptors option).

`safe_summary` is what logs, errors and `medgem dicom info` may show: a whitelist of technical fields
read from the de-identified copy.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import secrets
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, generate_uid

from medgem.inputs.dicom import WINDOW_PRESETS, frame_attr, frame_count, quiet_pydicom

# Removed wherever they appear (PS3.15 Table E.1-1 actions X/D/U that carry identity or free text).
_REMOVE = frozenset(
    {
        # patient identity and demographics
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientBirthTime",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "EthnicGroup",
        "Occupation",
        "AdditionalPatientHistory",
        "PatientComments",
        "MedicalAlerts",
        "Allergies",
        "SmokingStatus",
        "PregnancyStatus",
        "PatientReligiousPreference",
        "PatientSexNeutered",
        "SpecialNeeds",
        "RegionOfResidence",
        "CountryOfResidence",
        "MilitaryRank",
        "BranchOfService",
        "MedicalRecordLocator",
        "PatientInsurancePlanCodeSequence",
        "InsurancePlanIdentification",
        "ResponsibleOrganization",
        "PatientTransportArrangements",
        "CurrentPatientLocation",
        "PatientState",
        "AssignedLocation",
        "ReferencedPatientSequence",
        "PersonIdentificationCodeSequence",
        # visit and order numbers
        "AdmissionID",
        "IssuerOfAdmissionIDSequence",
        "ServiceEpisodeID",
        "IssuerOfServiceEpisodeIDSequence",
        "IssuerOfAccessionNumberSequence",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "OrderEntererLocation",
        "OrderCallbackPhoneNumber",
        "OrderCallbackTelecomInformation",
        "RequestAttributesSequence",
        # institution, staff and places
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "InstitutionalDepartmentTypeCodeSequence",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence",
        "ConsultingPhysicianIdentificationSequence",
        "PhysiciansOfRecordIdentificationSequence",
        "PerformingPhysicianIdentificationSequence",
        "PhysiciansReadingStudyIdentificationSequence",
        "OperatorIdentificationSequence",
        "RequestingPhysicianIdentificationSequence",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "PersonTelecomInformation",
        "HumanPerformerOrganization",
        "RequestingService",
        "StationName",
        "ScheduledStationName",
        "PerformedStationName",
        "ScheduledProcedureStepLocation",
        "PerformedLocation",
        "TimezoneOffsetFromUTC",
        # devices that identify a site
        "DeviceSerialNumber",
        "DetectorID",
        "PlateID",
        "CassetteID",
        "GantryID",
        # free text and copies of the original header
        "StudyComments",
        "ImageComments",
        "FrameComments",
        "VisitComments",
        "TextComments",
        "InterpretationText",
        "AcquisitionComments",
        "RequestedProcedureComments",
        "ImagingServiceRequestComments",
        "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence",
        "DerivationDescription",
        "ReasonForStudy",
        "ReasonForTheRequestedProcedure",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
        "ScheduledProcedureStepDescription",
        "ServiceEpisodeDescription",
        "ContentSequence",
        "OriginalAttributesSequence",
        "ModifiedAttributesSequence",
        "DigitalSignaturesSequence",
        "IconImageSequence",
    }
)
# Kept present but emptied (action Z: type 2 attributes an importer may require).
_BLANK = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
    }
)
# Identifiers whose values must not survive in cleaned descriptors.
_IDENTIFIERS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "StudyID",
        "MedicalRecordLocator",
        "AdmissionID",
        "RequestedProcedureID",
        "DeviceSerialNumber",
        "InstitutionName",
    }
)
_DESCRIPTORS = frozenset({"StudyDescription", "SeriesDescription", "ProtocolName"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})

# Per-process secret mixed into new UIDs: stable within a run (a whole series stays consistent),
# different across runs, and not reversible from the output.
_UID_SALT = secrets.token_hex(16)


def _new_uid(uid: str, salt: str) -> str:
    """Deterministic for (salt, uid): pydicom hashes the entropy sources under its own UID root."""
    return str(generate_uid(entropy_srcs=[salt, uid]))


def _keeps_uid(elem: DataElement) -> bool:
    """Class and syntax UIDs name a standard, not a patient or an instance."""
    return elem.keyword.endswith("ClassUID") or all(UID(str(v)).keyword for v in _values(elem))


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 2}


def _identifying_words(ds: Dataset) -> set[str]:
    """Every word of every name, ID and date in `ds` (at any depth), for cleaning descriptors."""
    words: set[str] = set()

    def collect(_ds: Dataset, elem: DataElement) -> None:
        if elem.VR in ("PN", "DA", "DT") or elem.keyword in _IDENTIFIERS:
            for value in _values(elem):
                words.update(_words(str(value)))

    ds.walk(collect)
    return words


def _shift_date(value: str, days: int) -> str:
    """Shift the YYYYMMDD part of a DA/DT value; unparsable values are blanked rather than kept."""
    try:
        shifted = dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)
    except ValueError:
        return ""
    return shifted.strftime("%Y%m%d") + value[8:]


def deidentify(ds: Dataset, *, date_shift_days: int | None = None, uid_salt: str | None = None) -> Dataset:
    """A de-identified deep copy of `ds` (see the module docstring); `ds` itself is not modified.

    date_shift_days: shift DA/DT values by this many days instead of blanking them (times are then
    kept). uid_salt: a secret to make UID mapping reproducible across runs (default: per process).
    """
    with quiet_pydicom():  # reading every value makes pydicom validate, and its warnings quote values
        return _deidentify(ds, date_shift_days, uid_salt or _UID_SALT)


def _deidentify(ds: Dataset, date_shift_days: int | None, salt: str) -> Dataset:
    out = copy.deepcopy(ds)
    identifying = _identifying_words(ds)
    out.remove_private_tags()

    def clean(dataset: Dataset, elem: DataElement) -> None:
        keyword, vr = elem.keyword, elem.VR
        if elem.tag.group & 0xFF00 in (0x5000, 0x6000) or vr == "AE":
            del dataset[elem.tag]
        elif keyword in _BLANK:
            elem.value = ""
        elif keyword in _REMOVE or vr == "PN":
            del dataset[elem.tag]
        elif keyword in _DESCRIPTORS:
            text = str(elem.value or "")
            if _words(text) & identifying or re.search(r"\d{6,}", text):
                del dataset[elem.tag]
        elif vr in _DATE_VRS and date_shift_days is None:
            elem.value = ""
        elif vr in ("DA", "DT"):
            shifted = [_shift_date(str(v), date_shift_days) for v in _values(elem)]
            elem.value = shifted if len(shifted) > 1 else (shifted[0] if shifted else "")
        elif vr == "UI" and not _keeps_uid(elem):
            new = [_new_uid(str(v), salt) for v in _values(elem)]
            elem.value = new if len(new) > 1 else (new[0] if new else "")

    out.walk(clean)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for elem in list(meta):
            if elem.VR == "AE":
                del meta[elem.tag]
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = (
        f"medgem PS3.15 basic profile subset, dates {'blanked' if date_shift_days is None else 'shifted'}"
    )
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = [code]
    return out


def _number(value: Any) -> float | int | None:
    """A header number for the summary; absent or malformed (never quoted) gives None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else round(number, 6)


def _numbers(value: Any) -> list[float | int | None] | float | int | None:
    if isinstance(value, MultiValue | list | tuple):
        return [_number(v) for v in value]
    return _number(value)


def safe_summary(ds: Dataset) -> dict[str, Any]:
    """Technical facts about an image, safe to log or print: read from a de-identified copy, whitelisted.

    Values are plain JSON types. Absent attributes are None.
    """
    clean = deidentify(ds)
    meta = getattr(clean, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop_class = clean.get("SOPClassUID")
    modality = clean.get("Modality")
    return {
        "modality": modality,
        "sop_class": UID(sop_class).name if sop_class else None,
        "rows": clean.get("Rows"),
        "columns": clean.get("Columns"),
        "frames": frame_count(clean),
        "photometric": clean.get("PhotometricInterpretation"),
        "samples_per_pixel": clean.get("SamplesPerPixel"),
        "bits_allocated": clean.get("BitsAllocated"),
        "bits_stored": clean.get("BitsStored"),
        "signed": bool(clean.get("PixelRepresentation")),
        "transfer_syntax": UID(syntax).name if syntax else None,
        "compressed": bool(syntax and UID(syntax).is_compressed),
        "body_part": clean.get("BodyPartExamined") or None,
        "study_description": clean.get("StudyDescription") or None,
        "series_description": clean.get("SeriesDescription") or None,
        "slice_thickness": _number(frame_attr(clean, 0, "PixelMeasuresSequence", "SliceThickness")),
        "pixel_spacing": _numbers(frame_attr(clean, 0, "PixelMeasuresSequence", "PixelSpacing")),
        "rescale_slope": _number(frame_attr(clean, 0, "PixelValueTransformationSequence", "RescaleSlope")),
        "rescale_intercept": _number(
            frame_attr(clean, 0, "PixelValueTransformationSequence", "RescaleIntercept")
        ),
        "window_center": _numbers(frame_attr(clean, 0, "FrameVOILUTSequence", "WindowCenter")),
        "window_width": _numbers(frame_attr(clean, 0, "FrameVOILUTSequence", "WindowWidth")),
        "voi_lut": bool(clean.get("VOILUTSequence")),
        "window_presets": sorted(WINDOW_PRESETS) if modality == "CT" else [],
        "burned_in_annotation": clean.get("BurnedInAnnotation") or None,
        "patient_identity_removed": clean.PatientIdentityRemoved,
    }
