"""Classifier heads on frozen image features: real fundus vs histopathology crops (scikit-image's
retina and IHC images) with MedGemma vision features, through the API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import medgem
from medgem.errors import CapabilityError
from medgem.retrieval.probe import Probe, read_labelled
from medgem.train.classify import medgemma_features, train_classifier

from .conftest import run_cli


@pytest.fixture(scope="module")
def crops_csv(tmp_path_factory):
    """40 random 96 px crops, half from a fundus photograph, half from an IHC colon section."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for label, image in (("fundus", skdata.retina()), ("histology", skdata.immunohistochemistry())):
        h, w = image.shape[:2]
        for i in range(20):
            y, x = int(rng.integers(h // 4, h * 3 // 4 - 96)), int(rng.integers(w // 4, w * 3 // 4 - 96))
            Image.fromarray(image[y:y + 96, x:x + 96]).save(folder / f"{label}-{i}.png")
            rows.append(f"{label}-{i}.png,{label}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_head_on_medgemma_features_beats_chance(crops_csv, tiny_mm_dir, tmp_path):
    extract = medgemma_features(medgem.load(tiny_mm_dir, dtype="float32", quant="none"))
    result = train_classifier(read_labelled(crops_csv), extract, "tiny", tmp_path / "head", eval_fraction=0.3)
    assert result["eval"]["n"] == 12 and result["chance_accuracy"] == 0.5
    assert result["eval"]["accuracy"] >= 0.8 and result["eval"]["roc_auc"] >= 0.85
    head = Probe.load(tmp_path / "head" / "probe.json")
    probs = head.predict_proba(extract(read_labelled(crops_csv)[0][:3]))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1)


def test_text_only_model_has_no_image_features(tiny_text_dir):
    with pytest.raises(CapabilityError, match="has no vision tower"):
        medgemma_features(medgem.load(tiny_text_dir, dtype="float32", quant="none"))


def test_cli_classify(crops_csv, tiny_mm_dir, tmp_path):
    result = run_cli(["finetune", "classify", str(crops_csv), "--model", str(tiny_mm_dir), "--out", str(tmp_path / "h")],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval"]["accuracy"] > report["chance_accuracy"]
    assert (tmp_path / "h" / "probe.json").is_file()
    missing = run_cli(["finetune", "classify", str(crops_csv), "--model", str(tmp_path / "nope"), "--out",
                       str(tmp_path / "x")], tmp_path)
    assert missing.returncode == 2 and "model not found" in missing.stderr
