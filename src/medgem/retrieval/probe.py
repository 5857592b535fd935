"""Data-efficient classification: a logistic-regression probe on frozen SigLIP image embeddings.

`train_probe` fits scikit-learn's LogisticRegression on embeddings of labelled images; the probe is
saved as plain JSON (classes, weights, the model fingerprint), never pickled, so loading one runs no
code. `learning_curve` measures how AUC grows with n labelled images per class (1, 2, 4, 8, ...): a
fixed stratified test split, and for each n several random draws of n training images per class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medgem.errors import InputError
from medgem.inputs.text import loads_json, read_csv, read_text

PATH_KEYS, LABEL_KEY = ("path", "image"), "label"


def read_labelled(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(image paths, labels) from a CSV with `path` (or `image`) and `label` columns."""
    path = Path(path)
    images, labels = [], []
    for number, row in enumerate(read_csv(path), 1):
        image = next((row[k] for k in PATH_KEYS if row.get(k)), None)
        if not image or not (row.get(LABEL_KEY) or "").strip():
            raise InputError(f"{path.name} row {number}: needs 'path' and 'label' values")
        images.append(str(Path(image) if Path(image).is_absolute() else path.parent / image))
        labels.append(row[LABEL_KEY].strip())
    if len(set(labels)) < 2:
        raise InputError(f"{path.name}: a probe needs at least two different labels")
    return images, labels


def _auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))


class Probe:
    """A fitted linear probe: classes plus weights, tied to the embedding model that produced its inputs."""

    def __init__(self, classifier, fingerprint: str):
        self.classifier, self.fingerprint = classifier, fingerprint

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.classifier.classes_]

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, classes] probabilities, columns in `classes` order."""
        return self.classifier.predict_proba(np.asarray(embeddings, np.float32))

    def save(self, path: str | os.PathLike[str]) -> None:
        c = self.classifier
        Path(path).write_text(json.dumps({
            "kind": "medgem-linear-probe", "fingerprint": self.fingerprint, "classes": self.classes,
            "coef": c.coef_.tolist(), "intercept": c.intercept_.tolist(), "C": c.C,
        }))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Probe:
        name = Path(path).name
        d = loads_json(read_text(path), name)
        from sklearn.linear_model import LogisticRegression  # after the checks: its import takes seconds

        try:
            if not isinstance(d, dict) or d.get("kind") != "medgem-linear-probe":
                raise ValueError("not a probe file")
            classifier = LogisticRegression(C=d["C"])
            classifier.classes_ = np.array(d["classes"])
            classifier.coef_, classifier.intercept_ = np.array(d["coef"]), np.array(d["intercept"])
            classifier.n_features_in_ = classifier.coef_.shape[1]
        except (ValueError, KeyError, TypeError, IndexError):  # the values are not echoed
            raise InputError(f"{name} is not a medgem probe file") from None
        return cls(classifier, d["fingerprint"])


def fit(embeddings: np.ndarray, labels, C: float = 1.0, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(embeddings, np.asarray(labels))


def train_probe(embeddings: np.ndarray, labels: list[str], fingerprint: str, C: float = 1.0) -> Probe:
    return Probe(fit(embeddings, labels, C), fingerprint)


def learning_curve(embeddings: np.ndarray, labels: list[str], shots: list[int] | None = None, *,
                   repeats: int = 5, test_fraction: float = 0.3, C: float = 1.0, seed: int = 0) -> dict:
    """AUC on a fixed stratified test split for n = 1, 2, 4, ... training images per class (mean, std
    and every draw); n stops at what the smallest class's training pool allows."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise InputError("every label needs at least 2 images (one to train on, one to test on)")
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    pool = {c: train_idx[y[train_idx] == c] for c in classes}
    largest = min(len(p) for p in pool.values())
    shots = [n for n in (shots or [2**i for i in range(12)]) if 1 <= n <= largest]
    rng = np.random.default_rng(seed)
    points = []
    for n in shots:
        aucs = []
        for _ in range(repeats):
            chosen = np.concatenate([rng.choice(pool[c], n, replace=False) for c in classes])
            model = fit(embeddings[chosen], y[chosen], C, seed)
            aucs.append(_auc(y[test_idx], model.predict_proba(embeddings[test_idx]), model.classes_))
        points.append({"n_per_class": n, "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                       "auc_all": aucs})
    return {"classes": classes.tolist(), "test_images": len(test_idx), "repeats": repeats, "points": points}


def plot_curve(curve: dict, path: str | os.PathLike[str], title: str = "Linear probe on SigLIP embeddings") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["n_per_class"] for p in curve["points"]]
    mean = np.array([p["auc_mean"] for p in curve["points"]])
    std = np.array([p["auc_std"] for p in curve["points"]])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, mean, marker="o")
    ax.fill_between(n, mean - std, mean + std, alpha=0.2)
    ax.set(xscale="log", xlabel="labelled images per class", ylabel="AUC (test split)", title=title, ylim=(0.4, 1.02))
    ax.set_xticks(n, [str(v) for v in n])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
