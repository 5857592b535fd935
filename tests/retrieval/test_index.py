"""The image index on real medical files: image-to-image search with augmented copies, de-identified
metadata, incremental updates, unreadable files, HNSW tombstones, and a build killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import medgem
from medgem.errors import ConfigError, InputError
from medgem.inputs.images import load_image
from medgem.retrieval.index import DB_NAME, ImageIndex

# Identifying values written in the DICOM test files (see tests/inputs); none may be stored.
IDENTIFIERS = ["CompressedSamples", "9RG1", "26210", "1CT1", "4MR1", "JFK IMAGING CENTER", "BAPTIST MED CTR",
               "20040826", "19950926", "19400305"]


def augmented(image: Image.Image) -> Image.Image:
    """An off-centre crop keeping 90% of each side, and 10% more brightness."""
    w, h = image.size
    box = (int(0.065 * w), int(0.035 * h), int(0.965 * w), int(0.935 * h))
    return ImageEnhance.Brightness(image.crop(box)).enhance(1.10)


@pytest.fixture(scope="module")
def encoder(retrieval_siglip):
    return medgem.load_siglip(retrieval_siglip)


@pytest.fixture(scope="module")
def built(tmp_path_factory, medical_images, encoder):
    folder = tmp_path_factory.mktemp("index") / "idx"
    with ImageIndex(folder, create=True) as index:
        stats = index.add(medical_images, encoder, batch_size=4, progress=False)
    return folder, stats


def test_augmented_copy_finds_its_original(tmp_path, built, medical_images, encoder):
    folder, stats = built
    files = sorted(p for p in medical_images.iterdir())
    assert stats == {"found": len(files), "skipped": 0, "added": len(files), "failed": 0}
    with ImageIndex(folder) as index:
        for original in files:
            query = tmp_path / f"query-{original.stem}.png"
            augmented(load_image(original)).save(query)
            hits = index.search(encoder.embed_images([query]), k=3)[0]
            assert Path(hits[0].path) == original.resolve(), f"{original.name}: got {[Path(h.path).name for h in hits]}"
            assert hits[0].score > hits[1].score


def test_dicom_metadata_is_deidentified(built):
    folder, _ = built
    stored = b"".join(p.read_bytes() for p in folder.iterdir())
    for identifier in IDENTIFIERS:
        assert identifier.encode() not in stored, identifier
    with ImageIndex(folder) as index:
        metas = {Path(h.path).stem: h for h in index.search(np.eye(1, int(index.info["dim"]), dtype=np.float32), k=20)[0]}
    assert metas["CT_small"].format == "dicom" and metas["CT_small"].meta["modality"] == "CT"
    assert metas["retina"].format == "png" and metas["retina"].meta["width"] == 1411


def test_incremental_add_change_remove_and_failures(tmp_path, medical_images, encoder):
    data = tmp_path / "data"
    shutil.copytree(medical_images, data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (data / "notes.txt").write_text("not an image")
    with ImageIndex(tmp_path / "idx", create=True, kind="flat") as index:
        first = index.add(data, encoder, progress=False)
        assert first["failed"] == 1 and first["added"] == first["found"] - 1 == 10
        assert index.failures() == [(str((data / "broken.png").resolve()), "InputError")]
        assert index.add(data, encoder, progress=False) == {"found": 11, "skipped": 11, "added": 0, "failed": 0}

        retina = data / "retina.png"
        Image.open(medical_images / "cell.png").save(retina)  # the file changes: re-embedded, old vector gone
        os.utime(retina, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert index.add(data, encoder, progress=False)["added"] == 1
        hits = index.search(encoder.embed_images([medical_images / "cell.png"]), k=2)[0]
        assert {Path(h.path).name for h in hits} == {"cell.png", "retina.png"}
        assert hits[1].score > 0.999

        assert index.remove(data / "retina.png") == 1
        assert index.remove(data) == 9
        assert len(index) == 0 and index.search(encoder.embed_texts(["x"]))[0] == []
    with pytest.raises(InputError, match="not an index"):
        ImageIndex(tmp_path / "nothing")


def test_hnsw_index_skips_removed_items(tmp_path, medical_images, encoder):
    with ImageIndex(tmp_path / "idx", create=True, kind="hnsw") as index:
        index.add(medical_images, encoder, progress=False)
        assert index.describe()["structure"] == "hnsw"
        query = encoder.embed_images([medical_images / "retina.png"])
        assert Path(index.search(query, k=1)[0][0].path).name == "retina.png"
        index.remove(medical_images / "retina.png")
        assert "retina.png" not in {Path(h.path).name for h in index.search(query, k=10)[0]}
    with ImageIndex(tmp_path / "idx") as index:  # the tombstone survives reopening the file
        assert "retina.png" not in {Path(h.path).name for h in index.search(query, k=10)[0]}
        assert len(index.search(query, k=10)[0]) == 9


def test_int8_index_ranks_like_the_exact_one(tmp_path, built, medical_images, encoder):
    queries = encoder.embed_images(sorted(medical_images.iterdir()))
    with ImageIndex(tmp_path / "idx", create=True, kind="int8") as index:
        index.add(medical_images, encoder, progress=False)
        assert index.describe()["kind"] == "int8"
        found = index.search(queries, k=5)
    with ImageIndex(built[0]) as exact:
        expected = exact.search(queries, k=5)
    for got, want in zip(found, expected):
        assert [Path(h.path).name for h in got] == [Path(h.path).name for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_another_model_is_refused(tmp_path, built, untrained_siglip):
    folder, _ = built
    with ImageIndex(folder) as index, pytest.raises(ConfigError, match="another model"):
        index.add(tmp_path, medgem.load_siglip(untrained_siglip), progress=False)


def test_killed_build_resumes_without_losing_work(tmp_path, medical_images, retrieval_siglip):
    data = tmp_path / "data"
    data.mkdir()
    for copy in range(4):  # 40 files, so the build is still running when it is killed
        for f in medical_images.iterdir():
            shutil.copy(f, data / f"{copy}-{f.name}")
    index = tmp_path / "idx"
    command = [sys.executable, "-m", "medgem.cli", "index", "build", str(data), "--out", str(index),
               "--model", str(retrieval_siglip), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed, deadline = 0, time.monotonic() + 240
    while committed < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if (index / DB_NAME).is_file():
            try:
                with sqlite3.connect(index / DB_NAME) as db:
                    committed = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is still being created
                pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    with sqlite3.connect(index / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    assert committed <= kept < 40 and kept % 2 == 0  # whole batches only

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{40 - kept} added, {kept} unchanged, 0 unreadable; 40 images" in done.stdout
    with ImageIndex(index) as resumed:
        assert sorted(Path(p).name for p in resumed.paths()) == sorted(p.name for p in data.iterdir())
        assert resumed.describe()["vectors"] == 40
