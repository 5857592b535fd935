"""Metric code checked against scikit-learn, rouge-score and sacrebleu on fixtures with known answers."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from medgem.eval import metrics

RNG = np.random.default_rng(123)
N, L = 300, 4
LABELS = RNG.integers(0, L, N)
Y1HOT = np.eye(L, dtype=int)[LABELS]
# Scores that carry signal: the true class gets a bump, then a softmax.
LOGITS = RNG.normal(size=(N, L)) + 1.5 * Y1HOT
PROBS = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
ALL = np.arange(N)


def test_macro_auc_equals_sklearn_one_vs_rest():
    ours = metrics.macro_auc(Y1HOT, PROBS)(ALL)
    assert ours == pytest.approx(roc_auc_score(LABELS, PROBS, multi_class="ovr", average="macro"))
    multi = (RNG.random((N, 3)) < 0.3).astype(int)
    scores = multi * 0.4 + RNG.random((N, 3))
    assert metrics.macro_auc(multi, scores)(ALL) == pytest.approx(roc_auc_score(multi, scores, average="macro"))


def test_auc_known_value_and_degenerate_subset():
    y = np.array([[0], [0], [1], [1]])
    s = np.array([[0.1], [0.4], [0.35], [0.8]])
    assert metrics.macro_auc(y, s)(np.arange(4)) == pytest.approx(0.75)  # the textbook example
    assert np.isnan(metrics.macro_auc(y, s)(np.array([0, 1])))  # one class only: undefined, not 0.5


def test_macro_f1_equals_sklearn_multiclass_and_multilabel():
    pred = metrics.predicted(PROBS, multi_label=False, threshold=0.5)
    assert metrics.macro_f1(Y1HOT, pred)(ALL) == pytest.approx(f1_score(LABELS, PROBS.argmax(1), average="macro"))
    sub = ALL[LABELS != 3]  # label 3 absent from truth and (mostly) prediction: sklearn's label set rule
    assert metrics.macro_f1(Y1HOT, pred)(sub) == pytest.approx(
        f1_score(LABELS[sub], PROBS[sub].argmax(1), average="macro"))
    multi = (RNG.random((N, 3)) < 0.4).astype(int)
    mpred = metrics.predicted(multi * 0.5 + RNG.random((N, 3)) * 0.6, multi_label=True, threshold=0.5)
    assert metrics.macro_f1(multi, mpred)(ALL) == pytest.approx(f1_score(multi, mpred, average="macro"))


def test_sensitivity_specificity_from_confusion_matrix():
    y = Y1HOT[:, :1]
    s = PROBS[:, :1]
    tn, fp, fn, tp = confusion_matrix(y[:, 0], (s[:, 0] >= 0.3).astype(int)).ravel()
    sens, spec = metrics.sens_spec(y, s, threshold=0.3)
    assert sens(ALL) == pytest.approx(tp / (tp + fn))
    assert spec(ALL) == pytest.approx(tn / (tn + fp))
    macro_sens, _ = metrics.sens_spec(Y1HOT, PROBS, threshold=0.3)
    per = [confusion_matrix(Y1HOT[:, j], PROBS[:, j] >= 0.3).ravel() for j in range(L)]
    assert macro_sens(ALL) == pytest.approx(np.mean([tp / (tp + fn) for _, _, fn, tp in per]))


def test_ece_hand_computed():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = np.array([1, 0, 1, 1, 0, 0])
    # bin 0.9-1.0: |0.5 - 0.95| * 2; bin 0.5-0.6: |0.5 - 0.55| * 4; over 6 items.
    assert metrics.ece(conf, correct)(np.arange(6)) == pytest.approx((0.45 * 2 + 0.05 * 4) / 6)


def test_rouge_l_matches_rouge_score_and_a_hand_count():
    from rouge_score import rouge_scorer

    preds = ["no acute cardiopulmonary process", "small left pleural effusion", "normal"]
    refs = ["no acute cardiopulmonary abnormality", "left pleural effusion is small", "cardiomegaly"]
    ours = metrics.rouge_l(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert ours == pytest.approx([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])
    # LCS("no acute cardiopulmonary process", "... abnormality") = 3 of 4 words each way: F = 0.75.
    assert ours[0] == pytest.approx(0.75) and ours[2] == 0.0


def test_bleu_equals_sacrebleu_corpus_bleu_on_any_subset():
    import sacrebleu

    preds = ["the heart size is normal", "there is a small effusion on the left", "no pneumothorax",
             "lungs are clear bilaterally", "mild cardiomegaly"]
    refs = ["heart size is normal", "small left pleural effusion is present", "no pneumothorax is seen",
            "the lungs are clear", "the heart is mildly enlarged"]
    fn = metrics.bleu(preds, refs)
    for idx in (np.arange(5), np.array([0, 2, 3]), np.array([1, 1, 4])):
        expected = sacrebleu.corpus_bleu([preds[i] for i in idx], [[refs[i] for i in idx]]).score
        assert fn(idx) == pytest.approx(expected)


def test_bootstrap_is_seeded_and_covers_the_binomial_spread():
    correct = (RNG.random(400) < 0.7).astype(float)
    fn = metrics.mean_of(correct)
    a, reps_a = metrics.estimate(fn, np.arange(400), 2000, metrics.seeded_rng(7, "x"))
    b, reps_b = metrics.estimate(fn, np.arange(400), 2000, metrics.seeded_rng(7, "x"))
    _, reps_c = metrics.estimate(fn, np.arange(400), 2000, metrics.seeded_rng(8, "x"))
    assert a == b and np.array_equal(reps_a, reps_b) and not np.array_equal(reps_a, reps_c)
    assert a.low < a.value < a.high
    p = correct.mean()
    normal_half_width = 1.96 * np.sqrt(p * (1 - p) / 400)
    assert (a.high - a.low) / 2 == pytest.approx(normal_half_width, rel=0.15)
    assert len(reps_a) == 2000


def test_mean_of_skips_not_applicable_items():
    fn = metrics.mean_of([1.0, np.nan, 0.0, np.nan])
    assert fn(np.arange(4)) == 0.5
    assert np.isnan(fn(np.array([1, 3])))
    est, _ = metrics.estimate(fn, np.array([1, 3]), 50, metrics.seeded_rng(0))
    assert est.as_dict() == {"value": None, "low": None, "high": None, "n": 2}
