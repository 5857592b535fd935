"""Derived-data caches (medgem/cache.py): atomic writes, hits refresh recency, folders stay bounded; and the
GGUF index and tokenizer caches go through them."""

from __future__ import annotations

import os

from medgem import cache
from medgem.processing.tokenizer import Tokenizer
from medgem.weights.gguf_reader import GGUFIndex


def test_write_read_and_prune_keeps_the_most_recently_used(tmp_path):
    for i in range(5):
        cache.write(tmp_path / f"k{i}", f"v{i}".encode(), keep=3)
        os.utime(tmp_path / f"k{i}", (1000.0 + i, 1000.0 + i))  # distinct mtimes in the past, k4 newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2", "k3", "k4"]
    assert cache.read(tmp_path / "k2") == b"v2"  # a hit: k2 becomes the most recently used
    cache.write(tmp_path / "k5", b"v5", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2", "k4", "k5"]
    assert cache.read(tmp_path / "gone") is None and not list(tmp_path.glob("*.partial"))


def test_gguf_index_and_tokenizer_use_the_cache(tmp_path, embedded_gguf):
    index = GGUFIndex.load(embedded_gguf, tmp_path / "gguf-index")
    again = GGUFIndex.load(embedded_gguf, tmp_path / "gguf-index")  # from the cached JSON
    assert [t.name for t in again.tensors] == [t.name for t in index.tensors] and again.key == index.key
    first = Tokenizer.from_gguf(index, tmp_path / "tokenizers")
    cached = Tokenizer.from_gguf(again, tmp_path / "tokenizers")
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    text = "Pneumothorax: 3.5 cm apical rim, ΔP 12 mmHg."
    assert cached.encode(text) == first.encode(text)
