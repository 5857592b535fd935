"""Classifier heads on frozen image features: real fundus vs histopathology crops (scikit-image's
retina and IHC images), MedGemma vision features, CSV errors, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from medgem.errors import InputError
from medgem.train.classify import (
    MedGemmaFeatures,
    load_head,
    predict_proba,
    read_csv,
    train_classifier,
)

from .conftest import run_cli


@pytest.fixture(scope="module")
def crops_csv(tmp_path_factory):
    """40 random 96 px crops, half from a fundus photograph, half from an IHC colon section."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for label, image in (("fundus", skdata.retina()), ("histology", skdata.immunohistochemistry())):
        h, w = image.shape[:2]
        for i in range(20):
            y, x = int(rng.integers(h // 4, h * 3 // 4 - 96)), int(rng.integers(w // 4, w * 3 // 4 - 96))
            Image.fromarray(image[y:y + 96, x:x + 96]).save(folder / f"{label}-{i}.png")
            rows.append(f"{label}-{i}.png,{label}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_head_on_medgemma_features_beats_chance(crops_csv, tiny_mm_dir, tmp_path):
    import medgem

    extract = MedGemmaFeatures(medgem.load(tiny_mm_dir, dtype="float32", quant="none"))
    result = train_classifier(read_csv(crops_csv), extract, tmp_path / "head", eval_fraction=0.3)
    assert result["eval"]["n"] == 12 and result["chance_accuracy"] == 0.5
    assert result["eval"]["accuracy"] >= 0.8 and result["eval"]["roc_auc"] >= 0.85
    head = load_head(tmp_path / "head")
    probs = predict_proba(head, extract(read_csv(crops_csv).paths[:3]))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1)


def test_csv_errors_name_the_row(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("image,label\na.png,x\nmissing.png,y\n")
    with pytest.raises(InputError, match="bad.csv line 3: image file not found"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['image'\]"):
        read_csv(tmp_path / "cols.csv")
    (tmp_path / "one.csv").write_text("image,label\na.png,x\na.png,x\n")
    with pytest.raises(InputError, match="at least two different labels"):
        read_csv(tmp_path / "one.csv")


def test_cli_classify(crops_csv, tiny_mm_dir, tmp_path):
    result = run_cli(["finetune", "classify", str(crops_csv), "--model", str(tiny_mm_dir), "--out", str(tmp_path / "h")],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval"]["accuracy"] > report["chance_accuracy"]
    text_only = run_cli(["finetune", "classify", str(crops_csv), "--model", str(tmp_path / "nope"), "--out",
                         str(tmp_path / "x")], tmp_path)
    assert text_only.returncode == 2 and "model not found" in text_only.stderr
