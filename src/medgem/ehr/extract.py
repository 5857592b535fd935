"""Lab values to FHIR: a lab report (text, a PDF or a page image) -> FHIR R4 Observation resources.

The model's answer is constrained to LAB_SCHEMA (engine/constraints.py), so it is JSON of that shape
whenever it finishes; a cut-off answer still yields the observations that closed before the cut. A
multimodal model reads a PDF's rendered pages, as MedGemma 1.5 is shown documents (its model card lists
lab reports as PDFs or page images); a text-only model reads the PDF's text layer instead, and the result
says so. Each value becomes an Observation that `fhir.resources` (R4B models, as inputs/fhir.py reads)
validates; one that does not (an impossible date, say) is dropped and counted, never written.

LOINC codes come only from LOINC_TABLE, a short table of common serum/blood tests matched by exact
(normalised) name; any other name is kept as `code.text` alone. Guessing codes from a fuzzy match
would write wrong codes that look right.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgem.ehr.synth import LABS, LOINC
from medgem.errors import CapabilityError, InputError
from medgem.inputs.documents import Document, read_document
from medgem.notice import NOTICE

_DATE = r"^\d{4}-\d{2}-\d{2}$"
LAB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"observations": {"type": "array", "maxItems": 40, "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 60},
            "value": {"type": "number"},
            "unit": {"type": "string", "maxLength": 20},
            "reference_range": {"type": "object", "properties": {"low": {"type": "number"}, "high": {"type": "number"}},
                                "required": ["low", "high"], "additionalProperties": False},
            "date": {"type": "string", "pattern": _DATE},
        },
        "required": ["name", "value", "unit", "reference_range", "date"],
        "additionalProperties": False,
    }}},
    "required": ["observations"],
    "additionalProperties": False,
}  # fmt: skip
INSTRUCTION = ("Extract every lab result in this report as JSON: for each test its name, numeric value, unit, "
               "reference range (low and high) and collection date (YYYY-MM-DD).")
MAX_NEW_TOKENS = 768  # about 40 tokens per result: a panel of 15-20

# name -> (LOINC code, display). Serum/plasma chemistry and whole-blood counts; the synthetic panel's seven
# come from ehr/synth.py so the two cannot disagree.
LOINC_TABLE: dict[str, tuple[str, str]] = {
    **{lab.name.lower(): (lab.loinc, lab.name) for lab in LABS.values()},
    "glucose": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    "chloride": ("2075-0", "Chloride [Moles/volume] in Serum or Plasma"),
    "bicarbonate": ("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma"),
    "urea nitrogen": ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma"),
    "calcium": ("17861-6", "Calcium [Mass/volume] in Serum or Plasma"),
    "albumin": ("1751-7", "Albumin [Mass/volume] in Serum or Plasma"),
    "alt": ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma"),
    "ast": ("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma"),
    "wbc": ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    "platelets": ("777-3", "Platelets [#/volume] in Blood by Automated count"),
}
_ALIASES = {"k": "potassium", "na": "sodium", "hemoglobin a1c": "hba1c", "glycated hemoglobin": "hba1c",
            "ldl": "ldl cholesterol", "ldl-c": "ldl cholesterol", "bun": "urea nitrogen", "co2": "bicarbonate",
            "hgb": "hemoglobin", "hb": "hemoglobin", "white blood cells": "wbc", "plt": "platelets",
            "alanine aminotransferase": "alt", "aspartate aminotransferase": "ast", "creat": "creatinine"}  # fmt: skip


def loinc_for(name: str) -> tuple[str, str] | None:
    """(code, display) for a test name in LOINC_TABLE (case, spacing and trailing punctuation ignored)."""
    key = re.sub(r"\s+", " ", name.strip().lower()).rstrip(" .:")
    return LOINC_TABLE.get(_ALIASES.get(key, key))


@dataclass
class Extraction:
    """What one report gave: FHIR Observations (validated), and how the report was read."""

    observations: list[dict[str, Any]]
    source: str  # "text", "pdf pages", "pdf text layer" or "image"
    answer: str  # the model's raw answer
    notes: list[str] = field(default_factory=list)  # anything the user must know (cut off, dropped, text layer)

    def bundle(self) -> dict[str, Any]:
        """A FHIR R4 Bundle (type collection) of the Observations."""
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
                "entry": [{"fullUrl": f"urn:uuid:{o['id']}", "resource": o} for o in self.observations]}


def parse_answer(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The observations in an answer, and whether it was whole JSON. A cut-off answer gives the items that
    closed before the cut; an answer with no JSON gives none."""
    start = text.find("{")
    if start < 0:
        return [], False
    try:
        data = json.loads(text[start:])
        items = data.get("observations") if isinstance(data, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else [], True
    except json.JSONDecodeError:
        pass
    found, decoder = [], json.JSONDecoder()
    pos = text.find("[", start)
    while pos >= 0:
        pos = text.find("{", pos)
        if pos < 0:
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(item, dict):
            found.append(item)
    return found, False


def to_observation(item: dict[str, Any], subject: str | None = None) -> dict[str, Any]:
    """One extracted value as a FHIR R4 Observation (not yet validated)."""
    name = str(item.get("name", "")).strip()
    coding = loinc_for(name)
    unit = str(item.get("unit", "")).strip()
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": str(uuid.uuid4()), "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {**({"coding": [{"system": LOINC, "code": coding[0], "display": coding[1]}]} if coding else {}),
                 "text": name},
        "effectiveDateTime": item.get("date"),
        "valueQuantity": {"value": item.get("value"), **({"unit": unit} if unit else {})},
        "note": [{"text": f"Extracted automatically from a lab report by medgem; not verified. {NOTICE}"}],
    }  # fmt: skip
    rng = item.get("reference_range")
    if isinstance(rng, dict) and {"low", "high"} <= set(rng):
        obs["referenceRange"] = [{"low": {"value": rng["low"], **({"unit": unit} if unit else {})},
                                  "high": {"value": rng["high"], **({"unit": unit} if unit else {})}}]
    if subject:
        obs["subject"] = {"reference": subject}
    return obs


def validate_observation(obs: dict[str, Any]) -> str | None:
    """None when fhir.resources accepts the Observation, else the first problem (field path and reason)."""
    from pydantic import ValidationError

    from medgem.inputs.fhir import _model_class, _problem

    try:
        _model_class("Observation").model_validate(obs)
    except ValidationError as exc:
        path, reason = _problem(exc)
        return f"{path}: {reason}"
    return None


def prompt_for(doc: Document, images: bool, base_model: bool) -> tuple[Any, str, bool]:
    """(prompt, source, raw) for a report: page images in a user turn, or its text (a completion prompt for
    a base model, which writes repetitive text in chat turns)."""
    if images and doc.pages:
        parts = [{"type": "image", "image": page} for page in doc.pages]
        return ([{"role": "user", "content": [*parts, {"type": "text", "text": INSTRUCTION}]}],
                "pdf pages" if doc.kind == "pdf" else "image", False)
    text = doc.text.replace("\f", "\n\n").strip()
    source = "pdf text layer" if doc.kind == "pdf" else "text"
    if base_model:
        return f"Lab report:\n{text}\n\n{INSTRUCTION}\nJSON:", source, True
    return f"{INSTRUCTION}\n\n{text}", source, False


def extract_labs(pipe: Any, path: str | Path, *, subject: str | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> Extraction:
    """Read a report and return its lab values as validated FHIR Observations (pipe: a medgem Pipeline)."""
    multimodal = bool(getattr(pipe, "supports_images", False))
    doc = read_document(path, images=multimodal)
    notes = []
    if doc.kind == "image" and not multimodal:
        raise CapabilityError(f"{doc.name} is a page image and model {pipe.source} has no vision tower; load a "
                              "multimodal MedGemma, or give the report as text or a PDF with a text layer")
    if doc.kind == "pdf" and not multimodal:
        if not doc.text.strip():
            raise InputError(f"{doc.name}: the PDF has no text layer (a scan?) and model {pipe.source} has no "
                             "vision tower to read its pages; load a multimodal MedGemma")
        notes.append(f"model {pipe.source} is text-only: read the PDF's text layer, not its {doc.page_count} "
                     "page image(s)")
    prompt, source, raw = prompt_for(doc, multimodal, bool(getattr(pipe, "base_model", False)))
    completion = pipe.complete([prompt], raw=raw, json_schema=LAB_SCHEMA, temperature=0.0,
                               max_new_tokens=max_new_tokens)[0]
    items, whole = parse_answer(completion.text)
    if not whole:
        cut = completion.finish_reason == "length"
        notes.append((f"the answer was cut off at {max_new_tokens} tokens (raise --max-new-tokens); " if cut
                      else "the answer was not complete JSON; ") + f"kept the {len(items)} value(s) that closed")
    observations, dropped = [], []
    for item in items:
        obs = to_observation(item, subject)
        problem = validate_observation(obs)
        if problem:
            dropped.append(problem)
        else:
            observations.append(obs)
    if dropped:
        notes.append(f"dropped {len(dropped)} value(s) that FHIR refuses (first: {dropped[0]})")
    return Extraction(observations, source, completion.text, notes)
