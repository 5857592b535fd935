"""A searchable image index on disk: SQLite for files, metadata and vectors, a vector store for search.

Layout of INDEX/: `index.sqlite` (the source of truth) and `vectors.faiss` (a derived FAISS file) or a
Qdrant collection named at creation. SQLite tables:
- `info`: embedding width, model fingerprint, store, kind;
- `items`: one row per indexed file: path, size, mtime, format, JSON metadata, the float32 vector;
- `changes`: every add and remove, numbered; stores replay the ones they lack (`sync`);
- `failures`: files that could not be read (by error class only), skipped until they change.

Building is incremental and resumable: a file whose size and mtime match its row is skipped, a changed
file is re-embedded under a new id, and each batch is one SQLite transaction, so a killed build keeps
every finished batch and the next run continues from there. DICOM headers are de-identified before
anything is kept: the only metadata stored is `medgem.inputs.deid.safe_summary` (a whitelist read
from the de-identified copy). File paths are stored as given, to show results; choose folder names
that do not identify patients.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from medgem.errors import ConfigError, InputError, MedgemError
from medgem.inputs import dicom
from medgem.inputs.deid import safe_summary
from medgem.inputs.images import load_image
from medgem.retrieval.store import FaissStore, QdrantStore, VectorStore

logger = logging.getLogger(__name__)

DB_NAME, FAISS_NAME = "index.sqlite", "vectors.faiss"
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, format TEXT NOT NULL, meta TEXT NOT NULL, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, item INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, error TEXT NOT NULL);
"""


@dataclass
class Hit:
    path: str
    score: float
    format: str
    meta: dict[str, Any]


@dataclass
class Prepared:
    """One file ready to embed (image set) or to record as a failure (error set)."""

    path: str
    size: int
    mtime_ns: int
    format: str = ""
    meta: dict[str, Any] | None = None
    image: Image.Image | None = None
    error: str | None = None


def sniff(path: Path) -> str | None:
    """'dicom', 'png' or 'jpeg' from the first bytes (DICOM files often have no extension), else None."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if dicom.is_dicom(head):
        return "dicom"
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    return "dicom" if path.suffix.lower() == ".dcm" else None  # old exports without the DICM preamble


def walk(root: str | os.PathLike[str]) -> list[Path]:
    """Every DICOM, PNG and JPEG file under `root` (or `root` itself), sorted, hidden entries skipped."""
    root = Path(root)
    if root.is_file():
        return [root.resolve()] if sniff(root) else []
    if root.exists() and not root.is_dir():
        raise InputError(f"{root.name}: not a regular file or folder (a pipe, socket or device)")
    if not root.is_dir():
        raise InputError(f"{dicom.missing_path(root)}: no such file or folder")
    found, special, undecodable = [], 0, 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if name.startswith("."):
                continue
            if not path.is_file():  # a FIFO would block the open forever; sockets and devices never end
                special += 1
            elif not _utf8(str(path)):  # the index stores paths as text
                undecodable += 1
            elif sniff(path):
                found.append(path.resolve())
    if special:
        logger.warning("%d non-regular file(s) (pipes, sockets, devices) skipped", special)
    if undecodable:
        logger.warning("%d file(s) whose path is not valid UTF-8 skipped; rename them to index them", undecodable)
    return found


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prepare(path: str) -> Prepared:
    """Read one file: the RGB image to embed and its safe metadata, or the error class that stopped it."""
    p = Path(path)
    stat = p.stat()
    item = Prepared(str(p), stat.st_size, stat.st_mtime_ns, format=sniff(p) or "unknown")
    try:
        if item.format == "dicom":
            item.meta = safe_summary(dicom.read_dicom(p, pixels=False))  # de-identified, whitelisted
        item.image = load_image(p)
        item.meta = {**(item.meta or {}), "width": item.image.width, "height": item.image.height}
    except MedgemError as exc:
        item.error, item.image = type(exc).__name__, None
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop a build of thousands
        item.error, item.image = f"{type(exc).__name__} (unexpected)", None
    return item


def open_store(folder: Path, info: dict[str, str]) -> VectorStore:
    url, dim = info.get("store", "faiss"), int(info["dim"])
    if url == "faiss":
        return FaissStore(folder / FAISS_NAME, dim, info.get("kind", "auto"))
    if url.startswith("qdrant:"):
        return QdrantStore(url, dim, seq=int(info.get("qdrant_seq", 0)))
    raise ConfigError(f"unknown vector store {url!r}; use faiss or qdrant://host:port")


class ImageIndex:
    """Open (or create with `create=True`) the index in `folder`; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str], *, create: bool = False, store: str = "faiss",
                 kind: str = "auto"):
        self.folder = Path(folder)
        if create and store != "faiss" and not store.startswith("qdrant:"):
            raise ConfigError(f"unknown vector store {store!r}; use faiss or qdrant://host:port")
        if not (self.folder / DB_NAME).is_file():
            if not create:
                raise InputError(f"{self.folder.name}: not an index (no {DB_NAME}); build one with `medgem index build`")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / DB_NAME)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            self.db.execute("SELECT COUNT(*) FROM items").fetchone()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise InputError(f"{self.folder.name}: {DB_NAME} is damaged or not an index database "
                             f"({type(exc).__name__}); rebuild it with `medgem index build`") from None
        if create:
            self._set_default("store", store)
            self._set_default("kind", kind)
        self._store: VectorStore | None = None

    # -- info ---------------------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM info"))

    def _set_default(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO info VALUES (?, ?)", (key, value))

    def _check_model(self, fingerprint: str, dim: int) -> None:
        """The first model to add vectors names the index; vectors of another model would be meaningless."""
        self._set_default("fingerprint", fingerprint)
        self._set_default("dim", str(dim))
        info = self.info
        if info["fingerprint"] != fingerprint or int(info["dim"]) != dim:
            raise ConfigError(
                f"{self.folder.name} was built with another model (fingerprint {info['fingerprint']}, "
                f"{info['dim']}-d); this one is {fingerprint} ({dim}-d). Use the same model or a new index"
            )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def paths(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT path FROM items ORDER BY id")]

    # -- building -----------------------------------------------------------------------------------
    def pending(self, files: Iterable[Path]) -> list[str]:
        """The files not indexed as they are now (new, changed, or a changed former failure)."""
        known = {p: (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM items")}
        known |= {p: (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM failures")}
        todo = []
        for f in files:
            stat = f.stat()
            if known.get(str(f)) != (stat.st_size, stat.st_mtime_ns):
                todo.append(str(f))
        return todo

    def commit(self, items: Sequence[Prepared], vectors: np.ndarray | None) -> None:
        """One transaction: replace the rows of these paths, log the changes, record failures."""
        ok = [item for item in items if item.error is None]
        with self.db:
            for item in items:
                old = self.db.execute("SELECT id FROM items WHERE path = ?", (item.path,)).fetchone()
                if old:
                    self.db.execute("DELETE FROM items WHERE id = ?", old)
                    self.db.execute("INSERT INTO changes (op, item) VALUES ('remove', ?)", old)
                self.db.execute("DELETE FROM failures WHERE path = ?", (item.path,))
                if item.error is not None:
                    self.db.execute("INSERT INTO failures VALUES (?, ?, ?, ?)",
                                    (item.path, item.size, item.mtime_ns, item.error))
            for item, vector in zip(ok, vectors if vectors is not None else []):
                cursor = self.db.execute(
                    "INSERT INTO items (path, size, mtime_ns, format, meta, vector) VALUES (?, ?, ?, ?, ?, ?)",
                    (item.path, item.size, item.mtime_ns, item.format, json.dumps(item.meta),
                     np.asarray(vector, np.float32).tobytes()),
                )
                self.db.execute("INSERT INTO changes (op, item) VALUES ('add', ?)", (cursor.lastrowid,))

    def add(self, root: str | os.PathLike[str], encoder, *, batch_size: int = 16, progress: bool = True,
            embed_batches: Callable[[list[str]], Iterator[tuple[list[Prepared], np.ndarray]]] | None = None
            ) -> dict[str, int]:
        """Index every new or changed DICOM/PNG/JPEG under `root`; returns counts.

        embed_batches: another way to turn paths into (prepared items, vectors) batches, e.g. Ray Data
        (medgem.retrieval.distributed); by default files are read and embedded here, batch by batch.
        """
        self._check_model(encoder.fingerprint, encoder.dim)
        files = walk(root)
        todo = self.pending(files)
        stats = {"found": len(files), "skipped": len(files) - len(todo), "added": 0, "failed": 0}
        batches = embed_batches(todo) if embed_batches else self._embed_here(todo, encoder, batch_size)
        bar = tqdm(total=len(todo), unit="file", desc="indexing", disable=not progress)
        for items, vectors in batches:
            self.commit(items, vectors)
            failed = sum(item.error is not None for item in items)
            stats["failed"] += failed
            stats["added"] += len(items) - failed
            bar.update(len(items))
        bar.close()
        if stats["failed"]:
            logger.warning("%d file(s) could not be read and were skipped (see `medgem index info`)", stats["failed"])
        self.sync()
        return stats

    @staticmethod
    def _embed_here(paths: list[str], encoder, batch_size: int) -> Iterator[tuple[list[Prepared], np.ndarray]]:
        for start in range(0, len(paths), batch_size):
            items = [prepare(p) for p in paths[start : start + batch_size]]
            images = [item.image for item in items if item.error is None]
            vectors = encoder.embed_pixels(encoder.processor(images)[0]) if images else None
            for item in items:
                item.image = None
            yield items, vectors

    def remove(self, root: str | os.PathLike[str]) -> int:
        """Drop every indexed file at or under `root` (the files themselves may be gone already)."""
        target = str(Path(root).resolve())
        prefix = target.rstrip(os.sep) + os.sep
        under = "path = ? OR substr(path, 1, ?) = ?"  # not LIKE: '%' and '_' are legal in file names
        args = (target, len(prefix), prefix)
        with self.db:
            rows = self.db.execute(f"SELECT id FROM items WHERE {under}", args).fetchall()
            for row in rows:
                self.db.execute("DELETE FROM items WHERE id = ?", row)
                self.db.execute("INSERT INTO changes (op, item) VALUES ('remove', ?)", row)
            self.db.execute(f"DELETE FROM failures WHERE {under}", args)
        self.sync()
        return len(rows)

    # -- the vector store ---------------------------------------------------------------------------
    @property
    def store(self) -> VectorStore:
        if self._store is None:
            if "dim" not in self.info:
                raise InputError(f"{self.folder.name} is empty: add images first")
            self._store = open_store(self.folder, self.info)
        return self._store

    def _vectors(self, ids: Sequence[int]) -> np.ndarray:
        dim = int(self.info["dim"])
        rows = [self.db.execute("SELECT vector FROM items WHERE id = ?", (i,)).fetchone()[0] for i in ids]
        return np.frombuffer(b"".join(rows), np.float32).reshape(len(ids), dim) if rows else np.zeros((0, dim), np.float32)

    def sync(self, chunk: int = 10_000) -> None:
        """Bring the store up to date with SQLite (replaying the changes it lacks, or rebuilding it)."""
        if "dim" not in self.info:
            return
        store = self.store
        structure = store.wants_rebuild(len(self)) if isinstance(store, FaissStore) else None
        if structure is not None or store.seq == 0:
            store.reset(structure)
        last = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        if store.seq >= last:
            return
        if store.seq == 0:  # from scratch: the items as they are now
            ids = [row[0] for row in self.db.execute("SELECT id FROM items ORDER BY id")]
            removed: list[int] = []
        else:
            changes = self.db.execute("SELECT op, item FROM changes WHERE seq > ? ORDER BY seq", (store.seq,)).fetchall()
            present = {row[0] for row in self.db.execute("SELECT id FROM items")}
            ids = [item for op, item in changes if op == "add" and item in present]
            removed = [item for op, item in changes if op == "remove"]
        store.apply(np.zeros(0, np.int64), np.zeros((0, int(self.info["dim"])), np.float32), np.array(removed))
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            store.apply(np.array(part), self._vectors(part), np.zeros(0, np.int64))
        store.commit(last)
        if isinstance(store, QdrantStore):
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO info VALUES ('qdrant_seq', ?)", (str(last),))

    # -- searching ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each query vector (unit length, the model's width), best first."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if len(self) == 0:
            return [[] for _ in queries]
        if queries.shape[1] != int(self.info["dim"]):
            raise InputError(f"query vectors are {queries.shape[1]}-d; the index holds {self.info['dim']}-d vectors")
        self.sync()
        scores, ids = self.store.search(queries, k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, i in zip(row_scores, row_ids):
                row = self.db.execute("SELECT path, format, meta FROM items WHERE id = ?", (int(i),)).fetchone()
                if i >= 0 and row:
                    hits.append(Hit(row[0], float(score), row[1], json.loads(row[2])))
            out.append(hits)
        return out

    def failures(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, error FROM failures ORDER BY path"))

    def describe(self) -> dict[str, Any]:
        info = self.info
        out = {"items": len(self), "failures": len(self.failures()), "dim": info.get("dim"),
               "fingerprint": info.get("fingerprint")}
        if "dim" in info:
            self.sync()
            out |= self.store.describe()
        return out

    def close(self) -> None:
        if isinstance(self._store, QdrantStore):
            self._store.close()
        self.db.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
