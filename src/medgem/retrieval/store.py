"""Vector stores behind one small interface: FAISS in a file next to the index, or a Qdrant collection.

The index's SQLite database is the source of truth (every vector, every change, numbered); a store is a
derived copy that `apply`s those changes in order and remembers the last change it holds (`seq`), so
it can always be brought up to date, or rebuilt, from SQLite.

FAISS kinds, all inner product on unit vectors (= cosine):
- `flat`: exact search, a scan of every vector, the only kind with perfect recall. Queries/s fall
  with size: about 100 at 1M x 1152-d on 2 idle cores (1,000 batched queries).
- `hnsw`: a graph (M=32, efConstruction=80). Recall rises and speed falls with `ef_search` (default
  128). Measured at 100k 1152-d vectors near a 32-d subspace (a stand-in for real embeddings), 2 busy
  cores: ef 64 -> recall@10 0.95 at 355 q/s, ef 128 -> 0.99 at 180 q/s, ef 256 -> 1.0 at 110 q/s;
  building it took 6 minutes. On uniformly random vectors no index beats a scan (recall@10 0.12 at
  ef 256): there are no neighbourhoods to find. benchmarks/retrieval.py has the numbers, IVF too.
  HNSW cannot delete, so removed ids are tombstones skipped at search time; the index is rebuilt
  when they pass a fifth of it.
- `int8`: the flat index searched by an int8 matrix-multiply scan that picks candidates, which are then
  ranked exactly in fp32 (retrieval/scan.py). Measured on 1M random 1152-d unit vectors, 2 cores,
  1,000 batched queries: recall@10 1.0 against exact at about 600 queries/s, 5.8x flat (BENCHMARKS.md). The int8 copy (a quarter of the vectors' memory) is built in memory at the first
  search after a change; the file is the same as flat's.
- `auto`: flat, switching to hnsw (one rebuild) once the index holds HNSW_FROM vectors.
The FAISS file is written to a temporary name and renamed, with its `seq` in its own header, so a
killed process leaves the previous complete file.

Qdrant (`qdrant://host:port[/collection]`, or `qdrant:///local/folder` for qdrant-client's embedded
mode) stores dot-product points whose ids are the SQLite item ids; upserts and deletes are idempotent,
so replaying changes after a crash is harmless. A server searches with its own HNSW (approximate, tuned
on the server); the embedded mode scans exactly.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

import numpy as np

from medgem.errors import ConfigError

if TYPE_CHECKING:
    from medgem.retrieval.scan import Int8Scan

logger = logging.getLogger(__name__)

HNSW_FROM = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
KINDS = ("auto", "flat", "int8", "hnsw")


class VectorStore(Protocol):
    seq: int  # the last SQLite change this store holds

    def apply(self, ids: np.ndarray, vectors: np.ndarray, removed: np.ndarray) -> None:
        """Add `vectors` under `ids` and drop `removed`."""

    def commit(self, seq: int) -> None:
        """Record (durably, where the store keeps its own file) that changes up to `seq` are in."""

    def reset(self, structure: str | None = None) -> None:
        """Forget everything before a rebuild from SQLite (FAISS: as `structure`, default its kind's)."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]); missing results have id -1."""

    def describe(self) -> dict: ...


class FaissStore:
    """A FAISS index in one file (see the module docstring for kinds and atomic writes)."""

    def __init__(self, path: Path, dim: int, kind: str = "auto"):
        import faiss

        if kind not in KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.faiss, self.path, self.dim, self.kind = faiss, Path(path), dim, kind
        self.ef_search = HNSW_EF_SEARCH
        # kind int8: the scan over the flat vectors and the row -> id map, built at the next search
        self._scan: tuple[Int8Scan, np.ndarray] | None = None
        self.reset()
        if self.path.is_file():
            self._read()

    def _new(self, structure: str):
        faiss = self.faiss
        if structure == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    @property
    def structure(self) -> str:
        return "hnsw" if isinstance(self.faiss.downcast_index(self.index.index), self.faiss.IndexHNSW) else "flat"

    def _read(self) -> None:
        data = self.path.read_bytes()
        try:
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + length])
            self.index = self.faiss.deserialize_index(np.frombuffer(data[8 + length :], dtype=np.uint8))
            self.seq, self.tombstones = int(header["seq"]), set(header.get("tombstones", []))
            self._scan = None
        except Exception as exc:  # noqa: BLE001 - a damaged derived file is rebuilt from SQLite, not fatal
            logger.warning("%s is damaged (%s); rebuilding it from the index database", self.path.name, type(exc).__name__)
            self.reset()

    def save(self) -> None:
        header = json.dumps({"seq": self.seq, "tombstones": sorted(self.tombstones)}).encode()
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.write(self.faiss.serialize_index(self.index).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)

    def reset(self, structure: str | None = None) -> None:
        structure = structure or ("hnsw" if self.kind == "hnsw" else "flat")
        self.seq, self.tombstones, self.index, self._scan = 0, set(), self._new(structure), None

    def wants_rebuild(self, total: int) -> str | None:
        """The structure a rebuild should use, or None when the current one is fine."""
        if self.kind == "auto" and self.structure == "flat" and total >= HNSW_FROM:
            return "hnsw"
        if self.tombstones and len(self.tombstones) > 0.2 * max(1, self.index.ntotal):
            return self.structure
        return None

    def apply(self, ids: np.ndarray, vectors: np.ndarray, removed: np.ndarray) -> None:
        self._scan = None
        if len(removed):
            if self.structure == "hnsw":
                self.tombstones.update(int(i) for i in removed)
            else:
                self.index.remove_ids(np.asarray(removed, dtype=np.int64))
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def commit(self, seq: int) -> None:
        self.seq = seq
        self.save()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss, queries = self.faiss, np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "int8" and self.structure == "flat" and self.index.ntotal:
            return self._int8_search(queries, k)
        if self.structure != "hnsw":
            return self.index.search(queries, k)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        # Both selectors stay referenced by these locals until the search returns (SWIG keeps no reference).
        removed = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64)) if self.tombstones else None
        keep = faiss.IDSelectorNot(removed) if removed is not None else None
        if keep is not None:
            params.sel = keep
        return self.index.search(queries, k, params=params)

    def _int8_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._scan is None:
            from medgem.retrieval.scan import Int8Scan  # torch: imported only when this kind searches

            flat = self.faiss.downcast_index(self.index.index)
            vectors = self.faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self.dim).reshape(-1, self.dim)
            # a view of FAISS's own memory, so it is dropped on every change
            self._scan = Int8Scan(vectors), self.faiss.vector_to_array(self.index.id_map)
        scan, ids = self._scan
        scores, rows = scan.search(queries, k)
        return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)

    def describe(self) -> dict:
        return {"store": "faiss", "kind": self.kind, "structure": self.structure, "vectors": int(self.index.ntotal),
                "removed_pending": len(self.tombstones)}


class QdrantStore:
    """A Qdrant collection (remote server, or qdrant-client's embedded local mode for one process)."""

    def __init__(self, url: str, dim: int, seq: int = 0):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError as exc:
            raise ConfigError("a qdrant:// store needs qdrant-client (pip install qdrant-client)") from exc
        parsed = urlparse(url)
        if parsed.scheme != "qdrant":
            raise ConfigError(f"a Qdrant store is written qdrant://host:port[/collection] or qdrant:///folder, got {url!r}")
        self.models, self.dim, self.seq, self.url = models, dim, seq, url
        if parsed.netloc:
            self.client = QdrantClient(host=parsed.hostname, port=parsed.port or 6333)
            self.collection = parsed.path.strip("/") or "medgem"
        else:
            self.client = QdrantClient(path=parsed.path)
            self.collection = "medgem"
        if not self.client.collection_exists(self.collection):
            self._create()

    def _create(self) -> None:
        params = self.models.VectorParams(size=self.dim, distance=self.models.Distance.DOT)
        self.client.create_collection(self.collection, vectors_config=params)

    def reset(self, structure: str | None = None) -> None:
        self.client.delete_collection(self.collection)
        self._create()
        self.seq = 0

    def apply(self, ids: np.ndarray, vectors: np.ndarray, removed: np.ndarray) -> None:
        models = self.models
        if len(removed):
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=[int(i) for i in removed]))
        for start in range(0, len(ids), 256):
            points = [models.PointStruct(id=int(i), vector=v.tolist())
                      for i, v in zip(ids[start : start + 256], vectors[start : start + 256])]
            self.client.upsert(self.collection, points=points, wait=True)

    def commit(self, seq: int) -> None:
        self.seq = seq  # the index keeps it in SQLite: replaying idempotent changes is harmless

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        models = self.models
        requests = [models.QueryRequest(query=q.tolist(), limit=k) for q in np.asarray(queries, dtype=np.float32)]
        scores, ids = np.full((len(requests), k), -np.inf, np.float32), np.full((len(requests), k), -1, np.int64)
        for row, response in enumerate(self.client.query_batch_points(self.collection, requests=requests)):
            for col, point in enumerate(response.points):
                scores[row, col], ids[row, col] = point.score, int(point.id)
        return scores, ids

    def describe(self) -> dict:
        return {"store": "qdrant", "url": self.url, "collection": self.collection,
                "vectors": int(self.client.count(self.collection, exact=True).count)}

    def close(self) -> None:
        self.client.close()
