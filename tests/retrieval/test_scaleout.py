"""Scale-out paths give what the embedded FAISS path gives: Ray Data embedding (a local Ray started here)
and a Qdrant store (qdrant-client's local mode), on the same real images and queries."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import medgem
from medgem.retrieval.index import ImageIndex

K = 5


@pytest.fixture(scope="module")
def encoder(retrieval_siglip):
    return medgem.load_siglip(retrieval_siglip)


@pytest.fixture(scope="module")
def queries(encoder, medical_images):
    images = encoder.embed_images(sorted(medical_images.iterdir())[::3])
    return np.concatenate([images, encoder.embed_texts(["a chest x-ray", "a fundus photograph"])])


@pytest.fixture(scope="module")
def faiss_results(tmp_path_factory, encoder, medical_images, queries):
    with ImageIndex(tmp_path_factory.mktemp("faiss") / "idx", create=True, kind="flat") as index:
        index.add(medical_images, encoder, progress=False)
        return index.search(queries, K)


def assert_same(results, expected) -> None:
    for got, want in zip(results, expected, strict=True):
        assert [h.path for h in got] == [h.path for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_ray_embedding_matches_local(tmp_path, encoder, retrieval_siglip, medical_images, queries, faiss_results):
    ray = pytest.importorskip("ray")
    from medgem.retrieval.distributed import ray_embed_batches

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ImageIndex(tmp_path / "idx", create=True, kind="flat") as index:
            embed = partial(ray_embed_batches, model=str(retrieval_siglip), batch_size=4, workers=2)
            stats = index.add(medical_images, encoder, embed_batches=embed, progress=False)
            assert stats["added"] == 10 and stats["failed"] == 0
            assert_same(index.search(queries, K), faiss_results)
            assert index.add(medical_images, encoder, embed_batches=embed, progress=False)["skipped"] == 10
    finally:
        ray.shutdown()


def test_qdrant_store_matches_faiss(tmp_path, encoder, medical_images, queries, faiss_results):
    pytest.importorskip("qdrant_client")
    url = f"qdrant://{tmp_path / 'qdrant'}"
    with ImageIndex(tmp_path / "idx", create=True, store=url) as index:
        index.add(medical_images, encoder, progress=False)
        assert_same(index.search(queries, K), faiss_results)
        assert index.describe()["store"] == "qdrant" and index.describe()["vectors"] == 10
        index.remove(medical_images / "retina.png")
    with ImageIndex(tmp_path / "idx") as index:  # reopened: the collection is kept and up to date
        assert index.describe()["vectors"] == 9
        assert all("retina.png" not in h.path for h in index.search(queries, K)[0])
