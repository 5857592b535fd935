"""The int8 scan (retrieval/scan.py) against exact search, and the FAISS store's `int8` kind: same top-k
as flat on random unit vectors (the hard case: near-tied scores), ids after removals, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from medgem.retrieval.scan import Int8Scan
from medgem.retrieval.store import FaissStore


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1), rows


@pytest.mark.parametrize("n,d,k", [(30_000, 256, 10), (5_000, 1152, 20), (3, 8, 5)])
def test_scan_finds_the_exact_top_k(n, d, k):
    rng = np.random.default_rng(n)
    vectors, queries = unit(rng, n, d), unit(rng, 600, d)  # > one query block
    scores, rows = Int8Scan(vectors).search(queries, k)
    want_scores, want_rows = exact_top(vectors, queries, k)
    found = min(k, n)
    recall = np.mean([len(set(r[:found]) & set(w[:found])) / found for r, w in zip(rows, want_rows)])
    assert recall >= 0.999, recall
    assert np.allclose(scores[:, :found], want_scores[:, :found], atol=1e-5)  # fp32 rerank: exact scores
    assert np.all(np.diff(scores[:, :found], axis=1) <= 1e-6)  # best first
    assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


def test_scan_handles_skewed_dimensions_and_zero_queries():
    rng = np.random.default_rng(0)
    vectors = unit(rng, 4_000, 64) * np.array([20.0] + [1.0] * 63, dtype=np.float32)  # one dominant dimension
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = unit(rng, 50, 64)
    _, rows = Int8Scan(vectors).search(queries, 10)
    _, want = exact_top(vectors, queries, 10)
    assert np.mean([len(set(r) & set(w)) / 10 for r, w in zip(rows, want)]) >= 0.99
    scores, rows = Int8Scan(vectors).search(np.zeros((2, 64), np.float32), 3)  # no crash, scores 0
    assert (rows >= 0).all() and np.allclose(scores, 0)
    scores, rows = Int8Scan(vectors[:0]).search(queries, 3)
    assert (rows == -1).all()


def test_int8_store_matches_flat_and_follows_removals(tmp_path):
    rng = np.random.default_rng(1)
    vectors, queries = unit(rng, 8_000, 128), unit(rng, 300, 128)
    ids = np.arange(100, 100 + len(vectors), dtype=np.int64) * 3  # ids are not row numbers
    stores = {kind: FaissStore(tmp_path / f"{kind}.faiss", 128, kind) for kind in ("flat", "int8")}
    for store in stores.values():
        store.apply(ids, vectors, np.array([], dtype=np.int64))
    removed = ids[::7]
    for store in stores.values():
        store.search(queries, 5)  # builds the int8 copy, which the removal must invalidate
        store.apply(np.array([], dtype=np.int64), np.zeros((0, 128), np.float32), removed)
        store.commit(1)
    (flat_scores, flat_ids), (int8_scores, int8_ids) = (s.search(queries, 10) for s in stores.values())
    assert not np.isin(int8_ids, removed).any()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat_ids, int8_ids)]) >= 0.999
    assert np.allclose(flat_scores, int8_scores, atol=1e-5)
    reopened = FaissStore(tmp_path / "int8.faiss", 128, "int8")  # the file is a flat index; search works
    assert reopened.describe()["structure"] == "flat" and np.array_equal(reopened.search(queries, 10)[1], int8_ids)
