"""From raw model outputs to per-item rows and headline metrics, one function per task kind.

Raw outputs are what the runner caches: generated text, or for log-likelihood a dict of per-option
sums and token counts (MCQ) or per-label probabilities (classification). Scoring is recomputed from
them on every run, so a better extractor or a new metric never needs the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgem.eval import extract, metrics
from medgem.eval.tasks import Item, Task


@dataclass
class Scored:
    """Per-item rows (for predictions.jsonl), metric functions over item indices, and plot inputs."""

    rows: list[dict[str, Any]]
    metrics: dict[str, metrics.MetricFn]
    primary: str
    extra: dict[str, Any] = field(default_factory=dict)
    confusion: tuple[list[str], list[str], list[str]] | None = None  # (labels, gold, predicted)
    roc: tuple[list[str], np.ndarray, np.ndarray] | None = None  # (labels, y_true [N,L], y_score [N,L])
    calibration: tuple[np.ndarray, np.ndarray] | None = None  # (confidence, correct)


def score_mcq(items: list[Item], outputs: list[Any], method: str) -> Scored:
    rows, correct = [], []
    conf, correct_norm = [], []
    for it, out in zip(items, outputs):
        row: dict[str, Any] = {"id": it.id, "gold": it.answer}
        if method == "loglik":
            letters = list(it.options)
            lp = np.array([out["logprob"][k] for k in letters])
            per_token = lp / np.maximum(1, np.array([out["ntokens"][k] for k in letters]))
            probs = metrics.softmax(lp)
            pred, pred_norm = letters[int(lp.argmax())], letters[int(per_token.argmax())]
            conf.append(float(probs.max()))
            correct_norm.append(float(pred_norm == it.answer))
            row |= {"pred": pred, "pred_norm": pred_norm, "probs": dict(zip(letters, probs.round(6).tolist()))}
        else:
            pred = extract.extract_choice(out, it.options)
            row |= {"pred": pred, "output": out}
        correct.append(float(pred == it.answer))
        row["correct"] = bool(correct[-1])
        rows.append(row)
    correct_arr = np.array(correct)
    scored = Scored(rows=rows, metrics={"accuracy": metrics.mean_of(correct_arr)}, primary="accuracy")
    scored.extra["chance"] = float(np.mean([1 / len(it.options) for it in items]))
    letters = sorted({k for it in items for k in it.options})
    scored.confusion = (letters + ["none"], [it.answer for it in items], [r["pred"] or "none" for r in rows])
    if method == "loglik":
        scored.metrics["accuracy_norm"] = metrics.mean_of(correct_norm)
        scored.calibration = (np.array(conf), correct_arr)
        scored.metrics["ece"] = metrics.ece(*scored.calibration)
    else:
        scored.extra["unparsed"] = sum(r["pred"] is None for r in rows)
    return scored


def score_vqa(items: list[Item], outputs: list[str]) -> Scored:
    f1 = np.array([extract.token_f1(out, it.answer) for it, out in zip(items, outputs)])
    closed = np.array([it.answer_type == "closed" for it in items])
    hit = np.array([float(extract.closed_match(out, it.answer)) if c else np.nan
                    for it, out, c in zip(items, outputs, closed)])
    rows = [{"id": it.id, "gold": it.answer, "output": out, "answer_type": it.answer_type, "f1": round(float(f), 6),
             **({"correct": bool(h)} if c else {})} for it, out, f, h, c in zip(items, outputs, f1, hit, closed)]
    return Scored(rows=rows, primary="f1", metrics={
        "f1": metrics.mean_of(f1),
        "f1_closed": metrics.mean_of(np.where(closed, f1, np.nan)),
        "f1_open": metrics.mean_of(np.where(closed, np.nan, f1)),
        "accuracy_closed": metrics.mean_of(hit),
    })


def score_classify(task: Task, items: list[Item], outputs: list[Any], method: str, threshold: float) -> Scored:
    labels = task.labels
    y_true = np.array([[lab in it.answer for lab in labels] for it in items], dtype=int)
    if method == "loglik":
        y_score = np.array([[out["probs"][lab] for lab in labels] for out in outputs], dtype=float)
    else:  # a generated reply names labels: score 1 for those, 0 for the rest
        named = [extract.mentioned(out, dict(zip(labels, labels))) for out in outputs]
        if not task.multi_label:
            named = [n[:1] for n in named]
        y_score = np.array([[lab in n for lab in labels] for n in named], dtype=float)
    # Generated scores are already 0/1; an unreadable reply predicts nothing rather than the first label.
    y_pred = metrics.predicted(y_score, task.multi_label, threshold) if method == "loglik" else y_score.astype(int)
    sens, spec = metrics.sens_spec(y_true, y_score, threshold)
    m = {"auc": metrics.macro_auc(y_true, y_score), "macro_f1": metrics.macro_f1(y_true, y_pred),
         "sensitivity": sens, "specificity": spec}
    rows = []
    for i, (it, out) in enumerate(zip(items, outputs)):
        pred = [lab for lab, p in zip(labels, y_pred[i]) if p]
        row: dict[str, Any] = {"id": it.id, "gold": it.answer, "pred": pred, "correct": set(pred) == set(it.answer)}
        row |= {"scores": dict(zip(labels, y_score[i].round(6).tolist()))} if method == "loglik" else {"output": out}
        rows.append(row)
    scored = Scored(rows=rows, metrics=m, primary="auc", roc=(labels, y_true, y_score))
    if not task.multi_label:
        gold = [it.answer[0] for it in items]
        scored.confusion = (labels + ["none"], gold, [r["pred"][0] if r["pred"] else "none" for r in rows])
        scored.metrics["accuracy"] = metrics.mean_of([float(r["correct"]) for r in rows])
        if method == "loglik":
            scored.calibration = (y_score.max(axis=1), np.array([float(r["correct"]) for r in rows]))
            scored.metrics["ece"] = metrics.ece(*scored.calibration)
    per_label = {}
    for j, lab in enumerate(labels):
        one = (y_true[:, j:j + 1], y_score[:, j:j + 1])
        s1, s0 = metrics.sens_spec(*one, threshold)
        idx = np.arange(len(items))
        per_label[lab] = {"n_positive": int(y_true[:, j].sum()), "auc": metrics.macro_auc(*one)(idx),
                          "sensitivity": s1(idx), "specificity": s0(idx)}
    scored.extra |= {"threshold": threshold, "multi_label": task.multi_label, "per_label": per_label}
    return scored


def score_report(items: list[Item], outputs: list[str]) -> Scored:
    refs = [it.answer for it in items]
    rouge = metrics.rouge_l(outputs, refs)
    rows = [{"id": it.id, "output": out, "rougeL": round(float(r), 6)} for it, out, r in zip(items, outputs, rouge)]
    return Scored(rows=rows, primary="rougeL",
                  metrics={"rougeL": metrics.mean_of(rouge), "bleu": metrics.bleu(outputs, refs)})


def score_ehrqa(items: list[Item], outputs: list[str]) -> Scored:
    """Exact match as `medgem.ehr.qa` defines it per answer type (a date, a count, a quantity, yes/no)."""
    from medgem.ehr.qa import ANSWER_TYPES, exact_match

    correct = np.array([float(exact_match(out, it.answer, it.answer_type if it.answer_type in ANSWER_TYPES else None))
                        for it, out in zip(items, outputs)])
    f1 = np.array([extract.token_f1(extract.clean(out), it.answer) for it, out in zip(items, outputs)])
    rows = [{"id": it.id, "gold": it.answer, "output": out, "answer_type": it.answer_type, "correct": bool(c),
             "f1": round(float(f), 6)} for it, out, c, f in zip(items, outputs, correct, f1)]
    return Scored(rows=rows, primary="accuracy", metrics={"accuracy": metrics.mean_of(correct),
                                                          "f1": metrics.mean_of(f1)})


def score(task: Task, items: list[Item], outputs: list[Any], method: str, threshold: float = 0.5) -> Scored:
    if task.kind == "mcq":
        return score_mcq(items, outputs, method)
    if task.kind == "vqa":
        return score_vqa(items, outputs)
    if task.kind == "classify":
        return score_classify(task, items, outputs, method, threshold)
    if task.kind == "report":
        return score_report(items, outputs)
    return score_ehrqa(items, outputs)
