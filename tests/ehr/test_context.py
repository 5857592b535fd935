"""Budgeted contexts: evidence recall over 500 synthetic questions with the real tokenizer, budgets
kept exactly, what was left out said, the sliding-window layout, and MiniLM against transformers."""

from __future__ import annotations

import re

import pytest

from medgem.ehr.context import ContextBuilder, words
from medgem.ehr.qa import evidence_found
from medgem.ehr.timeline import Timeline
from medgem.errors import ContextLengthError


@pytest.fixture(scope="session")
def builders(records, count_tokens):
    return [ContextBuilder(Timeline(r), count_tokens) for r in records]


def _questions(patients, limit=500):
    items = [(i, q) for i, p in enumerate(patients) for q in p.qa]
    assert len(items) >= limit
    return items[:limit]


def test_evidence_recall_at_2000_tokens_is_at_least_98_percent(patients, builders, count_tokens):
    found, too_long = 0, []
    for i, item in _questions(patients):
        context = builders[i].build(item["question"], 2000)
        found += evidence_found(item, context)
        if count_tokens(context.text) > 2000:
            too_long.append(context.tokens)
    assert not too_long
    assert found / 500 >= 0.98, f"recall {found / 500:.3f}"


def test_latest_values_are_in_the_text_itself(patients, builders):
    for i, item in _questions(patients, 200):
        if item["kind"] == "latest_lab":
            text = builders[i].build(item["question"], 1000).text
            name = item["question"].removeprefix("What is the most recent ").removesuffix(" result?")
            value, unit = item["answer"].split(" ", 1)
            assert re.search(rf"- {re.escape(name)}: {re.escape(value)} {re.escape(unit)}", text)


def test_budget_is_kept_and_what_was_left_out_is_said(builders, count_tokens):
    builder = max(builders, key=lambda b: len(b.chunks))
    small = builder.build("potassium", 900)
    assert small.tokens == count_tokens(small.text) <= 900
    assert small.omitted > 0 and small.shown > 0
    assert f"NOT SHOWN: {small.omitted} entries (" in small.text
    assert f"TIMELINE EXCERPTS ({small.shown} of {small.shown + small.omitted} other entries" in small.text
    excerpt = small.text.split("TIMELINE EXCERPTS", 1)[1]
    assert "Potassium" in excerpt and "Sodium" not in excerpt  # the question's series fills the room first
    for section in ("PATIENT:", "ACTIVE PROBLEMS:", "ACTIVE MEDICATIONS:", "ALLERGIES:", "LATEST LABS:"):
        assert section in small.text
    whole = builder.build("potassium", 100_000)
    assert whole.omitted == 0 and "NOT SHOWN" not in whole.text and "TIMELINE (all" in whole.text
    with pytest.raises(ContextLengthError, match="budget is 50; raise --budget"):
        builder.build("potassium", 50)


def test_first_or_earliest_prefers_old_entries(builders):
    builder = max(builders, key=lambda b: len(b.chunks))
    latest = builder.build("creatinine", 700)
    first = builder.build("first creatinine", 700)
    dates = lambda c: re.findall(r"^(\d{4}-\d{2}-\d{2}) lab Creatinine", c.text, re.M)  # noqa: E731
    assert min(dates(first)) < min(dates(latest))


def test_window_places_the_best_excerpts_next_to_the_question(builders, count_tokens):
    builder = max(builders, key=lambda b: len(b.chunks))
    context = builder.build("HbA1c", 1500, window=512)
    head, tail = context.text.split("MOST RELEVANT ENTRIES (date order):\n")
    assert count_tokens(tail) <= 256 and tail.count("HbA1c") >= 3
    assert "NOT SHOWN" in head and context.tokens <= 1500
    shown_once = [line for line in context.text.splitlines() if re.match(r"\d{4}-\d{2}-\d{2} ", line)]
    assert len(shown_once) == len(set(shown_once))  # moved, not repeated


def test_bm25_terms_drop_stop_words():
    assert words("What is the most recent Potassium result?") == ["potassium"]
    assert words("HbA1c 7.4 % above 7") == ["hba1c", "7.4", "above", "7"]


def test_minilm_matches_transformers_and_hybrid_retrieval_works(patients, records, count_tokens):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from medgem.ehr.embed import MiniLM, default_folder

    texts = ["Potassium: 5.6 mmol/L (ref 3.5-5.1) H", "Is the patient allergic to penicillin?", "x"]
    ours = MiniLM().encode(texts)
    tokenizer, model = AutoTokenizer.from_pretrained(default_folder()), AutoModel.from_pretrained(default_folder())
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)

    embedder = MiniLM()
    found = total = 0
    for p, record in list(zip(patients, records, strict=True))[:2]:
        builder = ContextBuilder(Timeline(record), count_tokens, embedder)
        for item in p.qa:
            found += evidence_found(item, builder.build(item["question"], 2000))
            total += 1
    assert found / total >= 0.98
