"""Image classification fine-tune: a linear head on frozen MedGemma or MedSigLIP image features.

This is the pneumothorax / histopathology kind of task: a CSV of image paths (PNG, JPEG or DICOM,
relative to the CSV) and labels. Features are computed once, then scikit-learn's multinomial
logistic regression is fitted on standardised features (a linear probe: few parameters, so it trains
in seconds on a CPU and does not overfit a few hundred images). The head is saved as safetensors
(weight, bias, feature mean and scale) with its label names, and scored on an eval split.

Features: MedSigLIP's unit-length image embeddings (`medgem.load_siglip`), or the mean of MedGemma's
SigLIP patch features (the vision tower of a multimodal checkpoint, before pooling and projection).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from medgem.errors import CapabilityError, CheckpointError, InputError

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    paths: list[str]
    labels: list[str]


def read_csv(path: str | Path, image_column: str = "image", label_column: str = "label") -> LabelledImages:
    """Rows of (image path, label); a missing column, empty label or missing file names the row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {image_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path.name} lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
        paths, labels = [], []
        for number, row in enumerate(reader, 2):  # line 1 is the header
            image, label = (row.get(image_column) or "").strip(), (row.get(label_column) or "").strip()
            if not image or not label:
                raise InputError(f"{path.name} line {number}: empty {image_column if not image else label_column}")
            full = Path(image) if Path(image).is_absolute() else path.parent / image
            if not full.is_file():
                raise InputError(f"{path.name} line {number}: image file not found: {full}")
            paths.append(str(full))
            labels.append(label)
    if len(set(labels)) < 2:
        raise InputError(f"{path.name} needs at least two different labels to train a classifier")
    return LabelledImages(paths, labels)


class MedGemmaFeatures:
    """Mean-pooled SigLIP patch features of a multimodal MedGemma pipeline."""

    def __init__(self, pipe: Any):
        if pipe.processor is None:
            raise CapabilityError(f"model {pipe.source} has no vision tower; load a multimodal MedGemma checkpoint "
                                  "or use MedSigLIP features (--siglip)")
        self.pipe = pipe

    @torch.inference_mode()
    def __call__(self, paths: list[str], batch_size: int = 8) -> np.ndarray:
        from medgem.processing.multimodal import to_rgb_image

        tower = self.pipe.model.vision_tower
        dtype = next(tower.parameters()).dtype
        out = []
        for i in range(0, len(paths), batch_size):
            pixels, _ = self.pipe.processor.image_processor([to_rgb_image(p) for p in paths[i:i + batch_size]])
            out.append(tower(pixels.to(dtype)).mean(dim=1).float().numpy())
        return np.concatenate(out)


def feature_extractor(model: str | None, siglip: bool, mmproj: str | None = None, device: str = "cpu"):
    """A callable paths -> [N, D] features."""
    import medgem

    if siglip:
        encoder = medgem.load_siglip(model, device=device)
        return lambda paths: encoder.embed_images(paths)
    return MedGemmaFeatures(medgem.load(model, mmproj=mmproj, dtype="float32", device=device, quant="none"))


def fit_head(features: np.ndarray, labels: list[str], c: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Standardise, then multinomial logistic regression; returns the head as arrays plus its classes."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit((features - mean) / scale, labels)
    weight, bias = clf.coef_, clf.intercept_
    if weight.shape[0] == 1:  # sklearn keeps one row for two classes: logits (0, z) give the same softmax
        weight, bias = np.concatenate([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    return {"weight": weight.astype(np.float32), "bias": bias.astype(np.float32), "mean": mean.astype(np.float32),
            "scale": scale.astype(np.float32), "classes": [str(c) for c in clf.classes_]}


def predict_proba(head: dict[str, Any], features: np.ndarray) -> np.ndarray:
    logits = ((features - head["mean"]) / head["scale"]) @ head["weight"].T + head["bias"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def metrics(head: dict[str, Any], features: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and one-vs-rest ROC AUC (macro) on labelled features."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    probs = predict_proba(head, features)
    predicted = [head["classes"][i] for i in probs.argmax(axis=1)]
    out = {"n": len(labels), "accuracy": accuracy_score(labels, predicted),
           "balanced_accuracy": balanced_accuracy_score(labels, predicted)}
    present = sorted(set(labels))
    if len(present) == len(head["classes"]):
        truth = np.array([head["classes"].index(label) for label in labels])
        out["roc_auc"] = (roc_auc_score(truth, probs[:, 1]) if len(present) == 2
                          else roc_auc_score(truth, probs, multi_class="ovr"))
    return out


def save_head(head: dict[str, Any], folder: str | Path, info: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(head[k]) for k in ("weight", "bias", "mean", "scale")}, folder / "head.safetensors")
    (folder / "head.json").write_text(json.dumps({"classes": head["classes"], **info}, indent=1))


def load_head(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / "head.safetensors").is_file() or not (folder / "head.json").is_file():
        raise CheckpointError(f"{folder} is not a classifier head folder (needs head.safetensors and head.json)")
    return {**load_file(folder / "head.safetensors"), "classes": json.loads((folder / "head.json").read_text())["classes"]}


def train_classifier(data: LabelledImages, extract, out: str | Path, eval_data: LabelledImages | None = None,
                     eval_fraction: float = 0.2, c: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit a head on `data` (holding out `eval_fraction`, stratified, when no eval set is given)."""
    from sklearn.model_selection import train_test_split

    if eval_data is None:
        try:
            tr_paths, ev_paths, tr_labels, ev_labels = train_test_split(
                data.paths, data.labels, test_size=eval_fraction, random_state=seed, stratify=data.labels)
        except ValueError as exc:
            raise InputError(f"cannot hold out {eval_fraction:.0%} for evaluation: {exc}") from None
        data, eval_data = LabelledImages(tr_paths, tr_labels), LabelledImages(ev_paths, ev_labels)
    train_x, eval_x = extract(data.paths), extract(eval_data.paths)
    head = fit_head(train_x, data.labels, c, seed)
    result = {"train": metrics(head, train_x, data.labels), "eval": metrics(head, eval_x, eval_data.labels),
              "classes": head["classes"], "feature_dim": int(train_x.shape[1]),
              "chance_accuracy": max(eval_data.labels.count(k) for k in set(eval_data.labels)) / len(eval_data.labels)}
    save_head(head, out, {"C": c, "seed": seed, "eval": result["eval"]})
    (Path(out) / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
