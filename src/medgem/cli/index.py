"""`medgem index build|add|remove|info`: a searchable index of DICOM/PNG/JPEG files (see
medgem.retrieval.index: SQLite metadata and vectors, FAISS or Qdrant for search).

build creates the index or resumes an interrupted build; add indexes new and changed files of another
folder; remove drops files or folders. DICOM headers are de-identified before anything is stored.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from medgem import progress
from medgem.cli.common import print_notice
from medgem.cli.embed import add_siglip_args, load_encoder
from medgem.retrieval.index import ImageIndex
from medgem.retrieval.store import KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build and update an image search index",
        description="Index medical images for semantic search with a SigLIP/MedSigLIP model.",
    )
    actions = parser.add_subparsers(dest="index_action", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help="index a folder (resumes an interrupted build)",
        description="Walk DIR for DICOM, PNG and JPEG files, embed them in batches and store them in INDEX. "
        "Rerunning continues where a killed build stopped; unchanged files are skipped.",
    )
    build.add_argument("dir", type=Path, metavar="DIR")
    build.add_argument("--out", type=Path, required=True, metavar="INDEX", help="index folder")
    _add_build_args(build, creating=True)
    build.set_defaults(func=run_build)

    add = actions.add_parser("add", help="index new or changed files into an existing index",
                             description="Index the new and changed files under DIR into INDEX.")
    add.add_argument("index", type=Path, metavar="INDEX")
    add.add_argument("dir", type=Path, metavar="DIR")
    _add_build_args(add, creating=False)
    add.set_defaults(func=run_build)

    remove = actions.add_parser("remove", help="drop files or folders from an index",
                                description="Remove every indexed file at or under each PATH.")
    remove.add_argument("index", type=Path, metavar="INDEX")
    remove.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    remove.set_defaults(func=run_remove)

    info = actions.add_parser("info", help="what an index holds", description="Counts, model and store of an index.")
    info.add_argument("index", type=Path, metavar="INDEX")
    info.add_argument("--failures", action="store_true", help="list the files that could not be read")
    info.set_defaults(func=run_info)


def _add_build_args(parser: argparse.ArgumentParser, creating: bool) -> None:
    if creating:
        parser.add_argument("--kind", default="auto", choices=KINDS,
                            help="FAISS structure: flat (exact), int8 (flat searched by an int8 scan and exact "
                            "rerank: near-exact, faster for batched queries), hnsw (approximate, large), auto "
                            "(flat, then hnsw from 50k images)")
        parser.add_argument("--store", default="faiss",
                            help="faiss (a file in INDEX), qdrant://host:port[/collection] or qdrant:///local/folder")
    parser.add_argument("--ray", action="store_true", help="embed on Ray Data (a local Ray unless --ray-address)")
    parser.add_argument("--ray-address", default=None, help="address of a running Ray cluster (implies --ray)")
    parser.add_argument("--workers", type=int, default=1, help="Ray embedding actors (default 1)")
    add_siglip_args(parser)


def run_build(args: argparse.Namespace) -> int:
    print_notice()
    encoder = load_encoder(args)
    folder = args.out if args.index_action == "build" else args.index
    options = {"create": True, "store": args.store, "kind": args.kind} if args.index_action == "build" else {}
    with ImageIndex(folder, **options) as index:
        embed_batches = None
        if args.ray or args.ray_address:
            from medgem.retrieval.distributed import ray_embed_batches

            embed_batches = partial(ray_embed_batches, model=str(Path(args.model).resolve()), address=args.ray_address,
                                    dtype=args.dtype, batch_size=args.batch_size, workers=args.workers)
        stats = index.add(args.dir, encoder, batch_size=args.batch_size, embed_batches=embed_batches,
                           progress=progress.enabled())
        print(f"{stats['added']} added, {stats['skipped']} unchanged, {stats['failed']} unreadable; "
              f"{len(index)} images in {folder}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    with ImageIndex(args.index) as index:
        removed = sum(index.remove(path) for path in args.paths)
        print(f"{removed} removed; {len(index)} images left")
    return 0


def run_info(args: argparse.Namespace) -> int:
    with ImageIndex(args.index) as index:
        info = index.describe()
        if args.failures:
            info["failed_files"] = [{"path": p, "error": e} for p, e in index.failures()]
        print(json.dumps(info, indent=2))
    return 0
