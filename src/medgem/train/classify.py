"""Image classification fine-tune: a linear head on frozen MedGemma or MedSigLIP image features.

This is the pneumothorax / histopathology kind of task: a CSV of image paths (PNG, JPEG or DICOM,
relative to the CSV) and labels. The head is retrieval/probe.py's logistic-regression probe (saved as
JSON, never pickled; `medgem probe predict` applies MedSigLIP ones). What this module adds is
MedGemma's own vision tower as a feature source, a held-out split, and accuracy and ROC AUC on it.

MedGemma features are the mean of the SigLIP patch features (before MedGemma's pooling and
projection), scaled to unit length like MedSigLIP's embeddings, so one regularisation suits both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgem.errors import CapabilityError, InputError
from medgem.retrieval import probe

Extract = Callable[[list[str]], np.ndarray]


def medgemma_features(pipe: Any, batch_size: int = 8) -> Extract:
    """paths -> [N, vision_hidden] unit-length mean patch features of a multimodal pipeline."""
    if pipe.processor is None:
        raise CapabilityError(f"model {pipe.source} has no vision tower; load a multimodal MedGemma checkpoint "
                              "or use MedSigLIP features (--siglip)")
    from medgem.processing.multimodal import to_rgb_image

    tower = pipe.model.vision_tower
    dtype = next(tower.parameters()).dtype

    @torch.inference_mode()
    def extract(paths: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(paths), batch_size):
            pixels, _ = pipe.processor.image_processor([to_rgb_image(p) for p in paths[i:i + batch_size]])
            out.append(torch.nn.functional.normalize(tower(pixels.to(dtype)).mean(dim=1).float(), dim=-1).numpy())
        return np.concatenate(out)

    return extract


def feature_extractor(model: str | None, siglip: bool, mmproj: str | None = None,
                      device: str = "cpu") -> tuple[Extract, str]:
    """(paths -> features, fingerprint of the model that makes them)."""
    import medgem

    if siglip:
        encoder = medgem.load_siglip(model, device=device)
        return (lambda paths: encoder.embed_images(paths)), encoder.fingerprint
    pipe = medgem.load(model, mmproj=mmproj, dtype="float32", device=device, quant="none")
    return medgemma_features(pipe), f"medgemma-vision:{pipe.source}"


def scores(fitted: probe.Probe, features: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, and ROC AUC (one-vs-rest, macro) when every class is present."""
    from sklearn.metrics import roc_auc_score

    probs = fitted.predict_proba(features)
    truth = np.asarray(labels)
    out: dict[str, Any] = {"n": len(labels),
                           "accuracy": float((np.asarray(fitted.classes)[probs.argmax(axis=1)] == truth).mean())}
    if set(labels) == set(fitted.classes):
        out["roc_auc"] = float(roc_auc_score(truth == fitted.classes[1], probs[:, 1]) if len(fitted.classes) == 2
                               else roc_auc_score(truth, probs, multi_class="ovr", labels=fitted.classes))
    return out


def train_classifier(data: tuple[list[str], list[str]], extract: Extract, fingerprint: str, out: str | Path,
                     eval_data: tuple[list[str], list[str]] | None = None, eval_fraction: float = 0.2,
                     c: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit a head on (paths, labels), holding out a stratified `eval_fraction` when no eval set is given;
    writes OUT/probe.json and OUT/metrics.json."""
    from sklearn.model_selection import train_test_split

    paths, labels = data
    if eval_data is None:
        try:
            paths, eval_paths, labels, eval_labels = train_test_split(
                paths, labels, test_size=eval_fraction, random_state=seed, stratify=labels)
        except ValueError as exc:
            raise InputError(f"cannot hold out {eval_fraction:.0%} of the images for evaluation: {exc}") from None
        eval_data = (eval_paths, eval_labels)
    train_x = extract(list(paths))
    fitted = probe.train_probe(train_x, list(labels), fingerprint, C=c)
    eval_labels = list(eval_data[1])
    result = {"train": scores(fitted, train_x, list(labels)),
              "eval": scores(fitted, extract(list(eval_data[0])), eval_labels), "classes": fitted.classes,
              "feature_dim": int(train_x.shape[1]),
              "chance_accuracy": max(eval_labels.count(k) for k in set(eval_labels)) / len(eval_labels)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fitted.save(out / "probe.json")
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
