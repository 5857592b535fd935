"""Synthetic patients: valid FHIR R4 Bundles with longitudinal histories, and an EHR-QA set.

Nothing public ships FHIR records or EHR questions with answers, so this generator makes both. Each
patient gets chronic conditions with matching medications (and dose changes or stops), lab series
that follow the conditions (potassium, creatinine, sodium, HbA1c, TSH, LDL), vitals, allergies,
immunizations, procedures, imaging studies with reports, care plans and free-text notes that
mention the patient's identifiers (so de-identification has something to remove).

The ground truth is computed here, from the generator's own lists, never by reading the FHIR back,
so the tests that compare it with the timeline can fail. Patient `i` of seed `s` is the same
whatever the number of patients asked for.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AS_OF = dt.date(2024, 6, 30)  # histories end here, so output never depends on today's date

LOINC, SNOMED, RXNORM, CVX = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://hl7.org/fhir/sid/cvx"  # fmt: skip
UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class Lab:
    name: str
    loinc: str
    unit: str
    low: float
    high: float
    mean: float
    sd: float
    digits: int = 1


LABS = {
    "potassium": Lab("Potassium", "2823-3", "mmol/L", 3.5, 5.1, 4.3, 0.45),
    "sodium": Lab("Sodium", "2951-2", "mmol/L", 135, 145, 140, 2.5, 0),
    "creatinine": Lab("Creatinine", "2160-0", "mg/dL", 0.6, 1.2, 0.95, 0.15, 2),
    "hba1c": Lab("HbA1c", "4548-4", "%", 4.0, 5.6, 5.4, 0.3),
    "tsh": Lab("TSH", "3016-3", "mIU/L", 0.4, 4.0, 2.0, 0.8, 2),
    "ldl": Lab("LDL cholesterol", "18262-6", "mg/dL", 0, 100, 105, 25, 0),
    "hemoglobin": Lab("Hemoglobin", "718-7", "g/dL", 12.0, 17.5, 14.0, 1.2),
}
VITALS = {
    "heart rate": ("8867-4", "Heart rate", "/min", 72, 9, 0),
    "weight": ("29463-7", "Body weight", "kg", 80, 14, 1),
    "systolic": ("8480-6", "Systolic blood pressure", "mm[Hg]", 128, 14, 0),
}


@dataclass(frozen=True)
class Chronic:
    key: str
    name: str
    snomed: str
    drug: str  # first-line medication
    rxnorm: str
    dose: float
    unit: str
    frequency: str
    shifts: dict[str, float] = field(default_factory=dict)  # lab key -> mean shift
    changes: str = ""  # "escalate": dose doubled later; "stop": stopped later


CHRONIC = [
    Chronic("t2dm", "Type 2 diabetes mellitus", "44054006", "metformin", "860975", 500, "mg", "twice daily",
            {"hba1c": 2.1}, "escalate"),
    Chronic("htn", "Essential hypertension", "59621000", "lisinopril", "314076", 10, "mg", "once daily",
            {"potassium": 0.2}, "escalate"),
    Chronic("ckd", "Chronic kidney disease stage 3", "433144002", "dapagliflozin", "1488564", 10, "mg",
            "once daily", {"creatinine": 0.7, "potassium": 0.35}),
    Chronic("hld", "Hyperlipidemia", "55822004", "atorvastatin", "617310", 20, "mg", "once daily at night",
            {"ldl": 40}, "escalate"),
    Chronic("hf", "Chronic heart failure", "84114007", "furosemide", "310429", 40, "mg", "once daily",
            {"potassium": -0.35, "sodium": -2}, "stop"),
    Chronic("hypo", "Hypothyroidism", "40930008", "levothyroxine", "966222", 50, "ug", "once daily",
            {"tsh": 2.5}, "escalate"),
    Chronic("af", "Atrial fibrillation", "49436004", "apixaban", "1364430", 5, "mg", "twice daily"),
    Chronic("asthma", "Asthma", "195967001", "budesonide inhaler", "1797855", 200, "ug", "twice daily",
            changes="stop"),
]  # fmt: skip
ACUTE = [("Acute bronchitis", "10509002"), ("Community acquired pneumonia", "385093006"),
         ("Urinary tract infection", "68566005"), ("Sprain of ankle", "44465007")]  # fmt: skip
ALLERGENS = [("penicillin", "764146007"), ("sulfonamide", "387406002"), ("peanut", "762952008"),
             ("latex", "111088007"), ("codeine", "387494007"), ("shellfish", "44027008")]  # fmt: skip
REACTIONS = [("Hives", "247472004"), ("Anaphylaxis", "39579001"), ("Rash", "271807003"), ("Nausea", "422587007")]
IMAGING = [("Chest X-ray", "CR", "399208008"), ("CT abdomen", "CT", "169070004"),
           ("MRI knee", "MR", "241582009"), ("Ultrasound abdomen", "US", "45036003")]  # fmt: skip
FINDINGS = ["No acute abnormality.", "Mild degenerative change.", "Small stable nodule, follow up in 12 months.",
            "Findings consistent with mild cardiomegaly."]  # fmt: skip
PROCEDURES = [("Colonoscopy", "73761001"), ("Echocardiography", "40701008"), ("Cataract surgery", "110473004")]
VACCINES = [("Influenza vaccine", "141"), ("COVID-19 vaccine", "208"), ("Pneumococcal vaccine", "33")]
GIVEN = {"female": ["Maria", "Ana", "Grace", "Fatima", "Olga", "Mei", "Priya", "Helen", "Amara", "Ingrid"],
         "male": ["James", "Omar", "Kenji", "Luis", "Pieter", "Samuel", "Arjun", "Tomasz", "Kwame", "Rafael"]}  # fmt: skip
FAMILY = ["Okafor", "Lindqvist", "Moreau", "Castellano", "Nakamura", "Kowalczyk", "Haddad", "Brennan",
          "Oyelaran", "Vasquez", "Thorsen", "Abernathy", "Delacroix", "Iwasaki", "Montague"]  # fmt: skip
STREETS = ["Birchwood Lane", "Harbor View Road", "Quarry Street", "Juniper Court", "Alder Avenue"]
CITIES = [("Millbrook", "NY"), ("Fairhaven", "MA"), ("Cedar Falls", "IA"), ("Port Ellis", "OR")]


def age_band(age: int) -> str:
    """Evaluation subgroup for an age in years."""
    return "18-49" if age < 50 else "50-64" if age < 65 else "65-79" if age < 80 else "80+"


@dataclass
class SyntheticPatient:
    """A generated Bundle with its ground truth and QA items."""

    id: str
    bundle: dict[str, Any]
    facts: dict[str, Any]
    qa: list[dict[str, Any]]


class _Builder:
    """Builds one patient's resources; `ref_style` "urn" for Bundles, "relative" for Bulk NDJSON."""

    def __init__(self, rng: random.Random, ref_style: str):
        self.rng = rng
        self.ref_style = ref_style
        self.resources: list[dict[str, Any]] = []

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def ref(self, resource: dict[str, Any]) -> dict[str, str]:
        rid = resource["id"]
        return {"reference": f"urn:uuid:{rid}" if self.ref_style == "urn" else f"{resource['resourceType']}/{rid}"}

    def add(self, resource_type: str, **fields: Any) -> dict[str, Any]:
        resource = {"resourceType": resource_type, "id": self.uid(), **fields}
        self.resources.append(resource)
        return resource


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _status(system_tail: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system_tail}", "code": code}]}


def _when(day: dt.date, rng: random.Random) -> str:
    return f"{day.isoformat()}T{rng.randint(7, 17):02d}:{rng.choice(['00', '15', '30', '45'])}:00+00:00"


def make_patient(seed: int, index: int, ref_style: str = "urn") -> SyntheticPatient:
    """Patient `index` of seed `seed`: its Bundle, ground-truth facts and QA items."""
    rng = random.Random(f"medgem-ehr-synth:{seed}:{index}")
    b = _Builder(rng, ref_style)
    sex = rng.choice(["female", "male"])
    birth = AS_OF - dt.timedelta(days=rng.randint(25 * 365, 92 * 365))
    age = AS_OF.year - birth.year - ((AS_OF.month, AS_OF.day) < (birth.month, birth.day))
    given, family = rng.choice(GIVEN[sex]), rng.choice(FAMILY)
    mrn = f"MRN{rng.randint(1000000, 9999999)}"
    ssn = f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    phone = f"({rng.randint(201, 989)}) {rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
    email = f"{given.lower()}.{family.lower()}{rng.randint(1, 99)}@example.net"
    street = f"{rng.randint(10, 9899)} {rng.choice(STREETS)}"
    city, state = rng.choice(CITIES)
    postal = f"{rng.randint(10000, 99899)}"
    patient = b.add(
        "Patient",
        identifier=[{"system": "http://hospital.example.org/mrn", "value": mrn},
                    {"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}],
        name=[{"use": "official", "family": family, "given": [given]}],
        telecom=[{"system": "phone", "value": phone, "use": "home"}, {"system": "email", "value": email}],
        gender=sex, birthDate=birth.isoformat(),
        address=[{"line": [street], "city": city, "state": state, "postalCode": postal, "country": "US"}],
    )  # fmt: skip
    pat = b.ref(patient)
    doctor = b.add("Practitioner", name=[{"family": rng.choice(FAMILY), "prefix": ["Dr."]}])
    start = max(AS_OF - dt.timedelta(days=rng.randint(2 * 365, 9 * 365)), birth + dt.timedelta(days=18 * 365))
    span = (AS_OF - start).days

    def day_in(lo: float, hi: float) -> dt.date:
        return start + dt.timedelta(days=rng.randint(int(span * lo), int(span * hi)))

    # Visits: the spine that labs, vitals and notes hang from.
    visits, day = [], start + dt.timedelta(days=rng.randint(0, 60))
    while day < AS_OF - dt.timedelta(days=7):
        visits.append(day)
        day += dt.timedelta(days=rng.randint(100, 260))
    encounters = {}
    for day in visits:
        encounters[day] = b.add(
            "Encounter", status="finished", subject=pat,
            **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"}},
            type=[_concept(SNOMED, "185349003", "Outpatient visit")],
            period={"start": _when(day, rng), "end": _when(day, rng)[:11] + "18:30:00+00:00"},
            participant=[{"individual": b.ref(doctor)}],
        )  # fmt: skip

    def near_visit(day: dt.date) -> dict[str, Any]:
        return encounters[min(visits, key=lambda v: abs((v - day).days))]

    facts: dict[str, Any] = {"sex": sex, "age": age, "age_band": age_band(age), "birth_date": birth.isoformat()}
    facts["identifiers"] = {"names": [given, family, f"{given} {family}"], "ids": [mrn, ssn], "phones": [phone],
                            "emails": [email], "addresses": [street, city, postal]}  # fmt: skip

    # Chronic conditions and their medications, with dose escalations and stops.
    chronic = rng.sample(CHRONIC, rng.randint(1, 4))
    problems, meds, onsets = [], [], {}
    for c in chronic:
        onset = onsets[c.key] = day_in(0.0, 0.6)
        cond = b.add(
            "Condition", subject=pat, onsetDateTime=onset.isoformat(), recordedDate=onset.isoformat(),
            clinicalStatus=_status("condition-clinical", "active"),
            verificationStatus=_status("condition-ver-status", "confirmed"),
            category=[_status("condition-category", "problem-list-item")],
            code=_concept(SNOMED, c.snomed, c.name),
        )  # fmt: skip
        problems.append({"name": c.name, "onset": onset.isoformat(), "ref": f"Condition/{cond['id']}", "active": True})
        begun = onset + dt.timedelta(days=rng.randint(0, 30))
        change = day_in(0.7, 0.95) if c.changes and rng.random() < 0.6 else None
        doses = [(begun, change, c.dose), (change, None, c.dose * 2)] if change and c.changes == "escalate" else [
            (begun, change, c.dose)]
        for first, last, dose in doses:
            status = "stopped" if last else "active"
            repeat = {"boundsPeriod": {"start": first.isoformat(), **({"end": last.isoformat()} if last else {})}}
            req = b.add(
                "MedicationRequest", status=status, intent="order", subject=pat, authoredOn=first.isoformat(),
                medicationCodeableConcept=_concept(RXNORM, c.rxnorm, c.drug),
                encounter=b.ref(near_visit(first)),
                dosageInstruction=[{"text": f"{dose:g} {c.unit} {c.frequency}", "timing": {"repeat": repeat},
                                    "doseAndRate": [{"doseQuantity": {"value": dose, "unit": c.unit,
                                                                      "system": UCUM, "code": c.unit}}]}],
            )  # fmt: skip
            meds.append({"drug": c.drug, "start": first.isoformat(), "end": last.isoformat() if last else "",
                         "dose": f"{dose:g} {c.unit}", "ref": f"MedicationRequest/{req['id']}"})  # fmt: skip
    for name, code in rng.sample(ACUTE, rng.randint(0, 2)):
        onset = day_in(0.0, 0.9)
        resolved = onset + dt.timedelta(days=rng.randint(7, 40))
        cond = b.add(
            "Condition", subject=pat, onsetDateTime=onset.isoformat(), abatementDateTime=resolved.isoformat(),
            clinicalStatus=_status("condition-clinical", "resolved"), code=_concept(SNOMED, code, name),
        )  # fmt: skip
        problems.append({"name": name, "onset": onset.isoformat(), "ref": f"Condition/{cond['id']}", "active": False})
    # An over-the-counter medication the patient reports taking.
    if rng.random() < 0.5:
        first = day_in(0.2, 0.8)
        stmt = b.add(
            "MedicationStatement", status="active", subject=pat, effectivePeriod={"start": first.isoformat()},
            medicationCodeableConcept=_concept(RXNORM, "243670", "aspirin"), dosage=[{"text": "81 mg once daily"}],
        )  # fmt: skip
        meds.append({"drug": "aspirin", "start": first.isoformat(), "end": "", "dose": "81 mg",
                     "ref": f"MedicationStatement/{stmt['id']}"})  # fmt: skip
    keys = {c.key for c in chronic}
    facts["problems"], facts["medications"] = problems, meds

    # Labs and vitals at visits, following the conditions present at that time.
    series: dict[str, list[dict[str, Any]]] = {}
    baseline = {key: rng.gauss(mean, sd) for key, (_, _, _, mean, sd, _) in VITALS.items()}
    for n, day in enumerate(visits):
        enc = encounters[day]
        wanted = ["potassium", "sodium", "creatinine"]
        wanted += ["hba1c"] if "t2dm" in keys or n % 3 == 0 else []
        wanted += ["tsh"] if "hypo" in keys and n % 2 == 0 else []
        wanted += ["ldl"] if "hld" in keys and n % 2 == 1 else []
        wanted += ["hemoglobin"] if n % 4 == 2 else []
        results = []
        for key in wanted:
            lab = LABS[key]
            mean = lab.mean + sum(c.shifts.get(key, 0) for c in chronic if onsets[c.key] <= day)
            value = round(max(lab.low * 0.5, rng.gauss(mean, lab.sd)), lab.digits)
            flag = "H" if value > lab.high else "L" if value < lab.low else "N"
            obs = b.add(
                "Observation", status="final", subject=pat, encounter=b.ref(enc),
                category=[_status("observation-category", "laboratory")],
                code=_concept(LOINC, lab.loinc, lab.name), effectiveDateTime=_when(day, rng),
                valueQuantity={"value": value, "unit": lab.unit, "system": UCUM, "code": lab.unit},
                interpretation=[_status("v3-ObservationInterpretation", flag)],
                referenceRange=[{"low": {"value": lab.low, "unit": lab.unit}, "high": {"value": lab.high, "unit": lab.unit}}],
            )  # fmt: skip
            results.append(b.ref(obs))
            series.setdefault(key, []).append(
                {"value": value, "unit": lab.unit, "date": day.isoformat(), "ref": f"Observation/{obs['id']}"}
            )
        b.add(
            "DiagnosticReport", status="final", subject=pat, encounter=b.ref(enc), effectiveDateTime=_when(day, rng),
            category=[_status("v2-0074", "LAB")], code=_concept(LOINC, "24323-8", "Metabolic panel"), result=results,
        )  # fmt: skip
        for key, (code, name, unit, _, sd, digits) in VITALS.items():
            b.add(
                "Observation", status="final", subject=pat, encounter=b.ref(enc),
                category=[_status("observation-category", "vital-signs")], code=_concept(LOINC, code, name),
                effectiveDateTime=_when(day, rng),
                valueQuantity={"value": round(rng.gauss(baseline[key], sd / 5), digits), "unit": unit, "system": UCUM, "code": unit},
            )  # fmt: skip
    facts["labs"] = series

    # Allergies, immunizations, procedures, imaging with reports, care plans.
    allergies = []
    for substance, code in rng.sample(ALLERGENS, rng.choice([0, 1, 1, 2])):
        reaction, rcode = rng.choice(REACTIONS)
        when = day_in(0.0, 0.9)
        allergy = b.add(
            "AllergyIntolerance", patient=pat, recordedDate=when.isoformat(),
            clinicalStatus=_status("allergyintolerance-clinical", "active"),
            verificationStatus=_status("allergyintolerance-verification", "confirmed"),
            code=_concept(SNOMED, code, substance), criticality="high" if reaction == "Anaphylaxis" else "low",
            reaction=[{"manifestation": [_concept(SNOMED, rcode, reaction)]}],
        )  # fmt: skip
        allergies.append({"substance": substance, "reaction": reaction, "ref": f"AllergyIntolerance/{allergy['id']}"})
    facts["allergies"] = allergies
    for name, code in VACCINES:
        for _ in range(rng.randint(0, 3)):
            b.add("Immunization", status="completed", patient=pat, vaccineCode=_concept(CVX, code, name),
                  occurrenceDateTime=day_in(0.0, 1.0).isoformat())  # fmt: skip
    for name, code in rng.sample(PROCEDURES, rng.randint(0, 2)):
        b.add("Procedure", status="completed", subject=pat, code=_concept(SNOMED, code, name),
              performedDateTime=_when(day_in(0.0, 1.0), rng))  # fmt: skip
    imaging = []
    for name, modality, code in rng.sample(IMAGING, rng.randint(1, 3)):
        day, study_uid = day_in(0.0, 1.0), f"2.25.{rng.getrandbits(96)}"
        study = b.add(
            "ImagingStudy", status="available", subject=pat, started=_when(day, rng), description=name,
            identifier=[{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
            modality=[{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}],
            numberOfSeries=rng.randint(1, 4), procedureCode=[_concept(SNOMED, code, name)],
        )  # fmt: skip
        report = b.add(
            "DiagnosticReport", status="final", subject=pat, effectiveDateTime=_when(day, rng),
            category=[_status("v2-0074", "RAD")], code=_concept(LOINC, "18748-4", f"{name} report"),
            imagingStudy=[b.ref(study)], conclusion=rng.choice(FINDINGS),
        )  # fmt: skip
        imaging.append({"name": name, "modality": modality, "date": day.isoformat(), "uid": study_uid,
                        "ref": f"ImagingStudy/{study['id']}", "report": f"DiagnosticReport/{report['id']}"})  # fmt: skip
    facts["imaging"] = imaging
    for c in chronic[:2]:
        b.add(
            "CarePlan", status="active", intent="plan", subject=pat, title=f"{c.name} care plan",
            period={"start": onsets[c.key].isoformat()},
            description=f"Long-term management of {c.name.lower()}.",
            activity=[{"detail": {"status": "in-progress", "description": f"Take {c.drug} as prescribed"}},
                      {"detail": {"status": "scheduled", "description": "Review at each visit"}}],
        )  # fmt: skip

    # Notes that mention identifiers and dates, as real notes do.
    notes = 0
    for day in visits:
        if rng.random() < 0.35:
            k = next((s for s in series["potassium"] if s["date"] == day.isoformat()), None)
            text = (
                f"Progress note. {given} {family} ({mrn}) seen on {day.month}/{day.day}/{day.year} "
                f"for routine follow-up. Contact: {phone}, {email}. Lives at {street}, {city}.\n"
                f"Problems: {', '.join(p['name'] for p in problems if p['active'])}. "
                f"Potassium today {k['value'] if k else 'not drawn'}. "
                f"Plan: continue current medications, next review after {(day + dt.timedelta(days=120)).isoformat()}."
            )
            b.add(
                "DocumentReference", status="current", subject=pat, date=_when(day, rng),
                type=_concept(LOINC, "11506-3", "Progress note"),
                content=[{"attachment": {"contentType": "text/plain; charset=utf-8",
                                         "data": base64.b64encode(text.encode()).decode()}}],
                context={"encounter": [b.ref(encounters[day])], "period": {"start": _when(day, rng)}},
            )  # fmt: skip
            notes += 1
    facts["counts"] = dict(Counter(r["resourceType"] for r in b.resources))
    facts["as_of"] = AS_OF.isoformat()

    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in b.resources]
    bundle = {"resourceType": "Bundle", "id": b.uid(), "type": "collection", "entry": entries}
    pid = patient["id"]
    return SyntheticPatient(pid, bundle, facts, _questions(pid, facts, rng))


# --- questions ---------------------------------------------------------------------------------


def _q(question: str, answer: str, answer_type: str, evidence: list[dict[str, str]], kind: str) -> dict[str, Any]:
    return {"question": question, "answer": answer, "answer_type": answer_type, "evidence": evidence, "kind": kind}


def _questions(pid: str, facts: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """About ten questions with exact answers, and the facts (resource refs or sections) they need."""
    out = []
    labs = facts["labs"]
    for key in rng.sample(["potassium", "creatinine", "hba1c", "sodium"], 2):
        if labs.get(key):
            last = labs[key][-1]
            name = LABS[key].name
            answer = f"{last['value']:g} {last['unit']}"
            out.append(_q(f"What is the most recent {name} result?", answer, "quantity",
                          [{"ref": last["ref"], "fact": f"{name} {answer} on {last['date']}"}], "latest_lab"))  # fmt: skip
    key = rng.choice(["creatinine", "potassium"])
    first = labs[key][0]
    out.append(_q(f"What was the first recorded {LABS[key].name} result?",
                  f"{first['value']:g} {first['unit']}", "quantity",
                  [{"ref": first["ref"], "fact": f"first {LABS[key].name} on {first['date']}"}], "first_lab"))  # fmt: skip
    for key, threshold in (("hba1c", 7.0), ("potassium", 5.1)):
        results = labs.get(key, [])
        if results:
            above = sum(r["value"] > threshold for r in results)
            unit = "%" if key == "hba1c" else " mmol/L"
            out.append(_q(f"How many {LABS[key].name} results were above {threshold:g}{unit}?", str(above), "count",
                          [{"ref": r["ref"], "fact": f"{r['value']} on {r['date']}"} for r in results], "count_above"))  # fmt: skip
    allergic = {a["substance"]: a for a in facts["allergies"]}
    if allergic:
        a = allergic[rng.choice(sorted(allergic))]
        out.append(_q(f"Is the patient allergic to {a['substance']}?", "yes", "yes_no",
                      [{"ref": a["ref"], "fact": f"allergy to {a['substance']}"}], "allergy"))  # fmt: skip
    absent = rng.choice([s for s, _ in ALLERGENS if s not in allergic])
    out.append(_q(f"Is the patient allergic to {absent}?", "no", "yes_no",
                  [{"section": "allergies", "fact": "allergy list"}], "allergy"))  # fmt: skip
    starts: dict[str, dict[str, str]] = {}
    for m in facts["medications"]:
        starts.setdefault(m["drug"], m)
    drug = rng.choice(sorted(starts))
    out.append(_q(f"When was {drug} started?", starts[drug]["start"], "date",
                  [{"ref": starts[drug]["ref"], "fact": f"{drug} started {starts[drug]['start']}"}], "med_start"))  # fmt: skip
    current = [m for m in facts["medications"] if not m["end"]]
    if current:
        m = rng.choice(current)
        out.append(_q(f"What is the current dose of {m['drug']}?", m["dose"], "quantity",
                      [{"ref": m["ref"], "fact": f"{m['drug']} {m['dose']}"}], "current_dose"))  # fmt: skip
    stopped = [m for m in facts["medications"] if m["end"] and m["drug"] not in {c["drug"] for c in current}]
    if stopped:
        m = rng.choice(stopped)
        out.append(_q(f"When was {m['drug']} stopped?", m["end"], "date",
                      [{"ref": m["ref"], "fact": f"{m['drug']} stopped {m['end']}"}], "med_stop"))  # fmt: skip
    p = rng.choice(facts["problems"])
    out.append(_q(f"Does the patient have active {p['name'].lower()}?", "yes" if p["active"] else "no", "yes_no",
                  [{"section": "problems", "fact": "active problem list"}], "problem"))  # fmt: skip
    absent_problem = rng.choice([c.name for c in CHRONIC if c.name not in {x["name"] for x in facts["problems"]}])
    out.append(_q(f"Does the patient have active {absent_problem.lower()}?", "no", "yes_no",
                  [{"section": "problems", "fact": "active problem list"}], "problem"))  # fmt: skip
    study = max(facts["imaging"], key=lambda s: s["date"])
    out.append(_q("When was the most recent imaging study?", study["date"], "date",
                  [{"ref": s["ref"], "fact": f"{s['name']} on {s['date']}"} for s in facts["imaging"]], "imaging"))  # fmt: skip
    for item in out:
        item.update(patient_id=pid, sex=facts["sex"], age=facts["age"], age_band=facts["age_band"])
    return out


# --- lab reports -------------------------------------------------------------------------------


def lab_report(facts: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The patient's latest lab panel as a plain-text report (what `medgem ehr extract` reads), and the
    values it holds ({name, value, unit, low, high, date}), from the generator's facts."""
    latest = max(r["date"] for results in facts["labs"].values() for r in results)
    rows = [{"name": LABS[key].name, "value": r["value"], "unit": r["unit"], "low": LABS[key].low,
             "high": LABS[key].high, "date": latest}
            for key, results in facts["labs"].items() for r in results if r["date"] == latest]  # fmt: skip
    lines = ["LABORATORY REPORT", "Specimen: serum", f"Collected: {latest}", "",
             f"{'Test':<18}{'Result':>8}  {'Unit':<8}Reference range"]  # fmt: skip
    lines += [f"{r['name']:<18}{r['value']:>8g}  {r['unit']:<8}{r['low']:g} - {r['high']:g}" for r in rows]
    lines += ["", "Synthetic report written by medgem ehr synth; not a real patient."]
    return "\n".join(lines) + "\n", rows


# --- writing -----------------------------------------------------------------------------------


def generate(patients: int, seed: int, ref_style: str = "urn") -> list[SyntheticPatient]:
    """`patients` synthetic patients, deterministic by seed."""
    return [make_patient(seed, i, ref_style) for i in range(patients)]


def write(out: str | Path, patients: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Write bundles/<id>.json, reports/<id>.txt (the latest lab panel), truth.jsonl and qa.jsonl under `out`;
    return a summary.

    Every file is written under a `.partial` name and renamed when whole, and the two JSONL files only
    after every bundle: a killed run leaves no file that looks complete, and a rerun writes them all again.
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    questions, first, first_report = 0, "", ""
    qa_path, truth_path = out / "qa.jsonl.partial", out / "truth.jsonl.partial"
    with qa_path.open("w") as qa, truth_path.open("w") as truth:
        for i in tqdm(range(patients), desc="synth", unit="patient", disable=not progress):
            p = make_patient(seed, i)
            path = f"bundles/{p.id}.json"
            partial = out / (path + ".partial")
            partial.write_text(json.dumps(p.bundle, separators=(",", ":")))
            os.replace(partial, out / path)
            report = out / "reports" / f"{p.id}.txt"
            partial = report.with_name(report.name + ".partial")
            partial.write_text(lab_report(p.facts)[0])
            os.replace(partial, report)
            first_report = first_report or str(report)
            truth.write(json.dumps({"patient_id": p.id, "bundle": path, **p.facts}) + "\n")
            for item in p.qa:
                qa.write(json.dumps({"bundle": path, **item}) + "\n")
            questions += len(p.qa)
            first = first or str(out / path)
    os.replace(truth_path, out / "truth.jsonl")
    os.replace(qa_path, out / "qa.jsonl")
    return {"patients": patients, "questions": questions, "seed": seed, "out": str(out), "first_bundle": first,
            "first_report": first_report}
