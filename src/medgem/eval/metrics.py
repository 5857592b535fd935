"""Metric arithmetic and seeded bootstrap confidence intervals.

A metric here is a function of an array of item indices (`MetricFn`). The headline value calls it on
all items; the bootstrap calls it on resamples; subgroups call it on a group's items. So one
definition serves the headline, the CI and every subgroup, whether the metric is a per-item mean
(accuracy, token F1, ROUGE-L) or a corpus statistic (AUC, macro-F1, BLEU, ECE).

Classification metrics come from scikit-learn, ROUGE-L from Google's `rouge-score`, BLEU from
`sacrebleu` (its per-sentence sufficient statistics are summed per resample, which is exactly
corpus BLEU on that resample).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

MetricFn = Callable[[np.ndarray], float]


@dataclass
class Estimate:
    """A point value with a 95 % percentile-bootstrap interval over `n` items."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A stream per (seed, names...), so a result never depends on the order things are computed in."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def replicates(fn: MetricFn, idx: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`fn` on `n_boot` resamples (with replacement) of `idx`; NaN where a resample is degenerate."""
    out = np.empty(n_boot)
    for b in range(n_boot):
        out[b] = fn(idx[rng.integers(0, len(idx), len(idx))])
    return out


def interval(reps: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the finite replicates (NaN if none)."""
    finite = reps[np.isfinite(reps)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def estimate(fn: MetricFn, idx: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[Estimate, np.ndarray]:
    """Point value on `idx`, its 95 % CI, and the replicates (kept for gap intervals)."""
    reps = replicates(fn, idx, n_boot, rng) if len(idx) else np.full(n_boot, np.nan)
    value = fn(idx) if len(idx) else float("nan")
    return Estimate(float(value), *interval(reps), n=int(len(idx))), reps


def softmax(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Log-likelihoods of options -> probabilities among those options."""
    a = np.asarray(x, dtype=float)
    e = np.exp(a - a.max())
    return e / e.sum()


# ---- per-item means ----

def mean_of(values: Sequence[float] | np.ndarray) -> MetricFn:
    """Mean of per-item values; NaN entries mean 'not applicable' (e.g. closed accuracy on open items)."""
    v = np.asarray(values, dtype=float)

    def fn(idx: np.ndarray) -> float:
        x = v[idx]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else float("nan")

    return fn


# ---- classification ----

def _binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> MetricFn:
    """One-vs-rest ROC AUC per label (y_true [N, L] in {0,1}), averaged over labels that have both classes."""

    def fn(idx: np.ndarray) -> float:
        aucs = [_binary_auc(y_true[idx, j], y_score[idx, j]) for j in range(y_true.shape[1])]
        aucs = [a for a in aucs if np.isfinite(a)]
        return float(np.mean(aucs)) if aucs else float("nan")

    return fn


def predicted(y_score: np.ndarray, multi_label: bool, threshold: float) -> np.ndarray:
    """Hard 0/1 predictions [N, L]: the argmax label (single-label) or every score >= threshold."""
    if multi_label:
        return (y_score >= threshold).astype(int)
    hard = np.zeros_like(y_score, dtype=int)
    hard[np.arange(len(y_score)), y_score.argmax(axis=1)] = 1
    return hard


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> MetricFn:
    """Macro-F1 over the labels present (in truth or prediction), from scikit-learn on indicator
    columns; for single-label data this equals sklearn's multiclass macro-F1 on the label names."""
    from sklearn.metrics import f1_score

    def fn(idx: np.ndarray) -> float:
        t, p = y_true[idx], y_pred[idx]
        present = (t.sum(axis=0) + p.sum(axis=0)) > 0
        if not present.any():
            return float("nan")
        return float(f1_score(t[:, present], p[:, present], average="macro", zero_division=0))

    return fn


def sens_spec(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> tuple[MetricFn, MetricFn]:
    """Macro (over labels, one-vs-rest) sensitivity and specificity of `score >= threshold`."""
    hard = (y_score >= threshold).astype(int)

    def rate(idx: np.ndarray, positive: int) -> float:
        vals = []
        for j in range(y_true.shape[1]):
            mask = y_true[idx, j] == positive
            if mask.any():
                vals.append(float((hard[idx, j][mask] == positive).mean()))
        return float(np.mean(vals)) if vals else float("nan")

    return (lambda idx: rate(idx, 1)), (lambda idx: rate(idx, 0))


# ---- calibration ----

def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10):
    """Per equal-width confidence bin: (mean confidence, accuracy, count); empty bins are NaN, 0."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    conf, acc, count = np.full(n_bins, np.nan), np.full(n_bins, np.nan), np.zeros(n_bins, dtype=int)
    for b in range(n_bins):
        m = which == b
        count[b] = int(m.sum())
        if count[b]:
            conf[b], acc[b] = confidence[m].mean(), correct[m].mean()
    return conf, acc, count


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> MetricFn:
    """Expected calibration error: bin-count-weighted |accuracy - confidence| over equal-width bins."""

    def fn(idx: np.ndarray) -> float:
        conf, acc, count = reliability_bins(confidence[idx], correct[idx], n_bins)
        used = count > 0
        return float(np.sum(count[used] * np.abs(acc[used] - conf[used])) / max(1, count.sum()))

    return fn


# ---- text generation ----

def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-item ROUGE-L F-measure (rouge-score, Porter stemming as in the report-generation literature)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def bleu(predictions: Sequence[str], references: Sequence[str]) -> MetricFn:
    """Corpus BLEU (sacrebleu defaults, 0-100) on any subset, from per-item n-gram statistics."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    # sacrebleu's own paired bootstrap uses these per-segment statistics the same way.
    stats = np.asarray(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.int64)

    def fn(idx: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score)

    return fn
