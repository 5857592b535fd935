"""Longitudinal EHR data for MedGemma: FHIR records in, budgeted question contexts out.

Read top to bottom, a request goes:
  medgem.inputs.fhir.load_record   FHIR R4 Bundle / Bulk NDJSON -> validated, normalised `Record`
  deid.deidentify                  (optional) identifiers redacted, dates shifted per patient
  timeline.Timeline                chronological events + the always-shown current state
  context.ContextBuilder           fixed sections + BM25 (+ MiniLM, embed.py) excerpts under a token budget
  qa                               completion prompts for a base model, answer extraction, exact match
  synth                            synthetic patients and an EHR-QA set with exact answers
"""
