"""Embedding a large collection on a Ray cluster (Ray Data), feeding the same index as a local build.

Each Ray worker loads the SigLIP model once (`_Embedder`), then reads, de-identifies and embeds its
batches of files with exactly the code a local build runs (`retrieval.index.prepare`). The driver
receives (items, vectors) batches and commits each to SQLite, so resumability and atomicity are the
same as for a local build. Workers need the model folder and the image files at the same paths
(a shared filesystem); `address=None` starts a local Ray for this process and stops it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from medgem.errors import ConfigError
from medgem.retrieval.index import Prepared, prepare


class _Embedder:
    """A Ray Data map_batches callable: paths in, metadata + vectors (zeros where a file failed) out."""

    def __init__(self, model: str, dtype: str | None):
        from medgem.siglip import load_siglip

        self.encoder = load_siglip(model, dtype=dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [prepare(str(p)) for p in batch["path"]]
        ok = [i for i, item in enumerate(items) if item.error is None]
        vectors = np.zeros((len(items), self.encoder.dim), np.float32)
        if ok:
            pixels = self.encoder.processor([items[i].image for i in ok])[0]
            vectors[ok] = self.encoder.embed_pixels(pixels)
        return {
            "path": np.array([item.path for item in items]),
            "size": np.array([item.size for item in items], np.int64),
            "mtime_ns": np.array([item.mtime_ns for item in items], np.int64),
            "format": np.array([item.format for item in items]),
            "meta": np.array([json.dumps(item.meta) for item in items]),
            "error": np.array([item.error or "" for item in items]),
            "vector": vectors,
        }


def ray_embed_batches(paths: list[str], model: str, *, address: str | None = None, dtype: str | None = None,
                      batch_size: int = 16, workers: int = 1) -> Iterator[tuple[list[Prepared], np.ndarray]]:
    """(items, vectors of the readable items) batches for `ImageIndex.add(embed_batches=...)`."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError('--ray needs Ray Data: pip install "ray[data]"') from exc
    if not paths:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.from_items([{"path": p} for p in paths]).map_batches(
            _Embedder, fn_constructor_kwargs={"model": model, "dtype": dtype}, batch_size=batch_size,
            concurrency=workers, batch_format="numpy",
        )
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            items = [
                Prepared(str(path), int(size), int(mtime), str(fmt), json.loads(meta), error=str(error) or None)
                for path, size, mtime, fmt, meta, error in zip(
                    batch["path"], batch["size"], batch["mtime_ns"], batch["format"], batch["meta"], batch["error"])
            ]
            keep = [i for i, item in enumerate(items) if item.error is None]
            yield items, batch["vector"][keep]
    finally:
        if started:
            ray.shutdown()
