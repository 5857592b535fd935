"""`medgem search INDEX "text"` or `--image FILE`: the top-k indexed images, with scores and paths.

Scores are cosine similarities between the query's embedding and each image's. `--html` writes a
self-contained contact sheet with thumbnails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgem.cli.common import print_notice
from medgem.cli.embed import add_siglip_args, load_encoder
from medgem.errors import ConfigError, InputError
from medgem.retrieval.html import write_contact_sheet
from medgem.retrieval.index import ImageIndex


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search an image index by text or by example image",
        description="Find the indexed images closest to a text query or to an example image.",
    )
    parser.add_argument("index", type=Path, metavar="INDEX")
    parser.add_argument("query", nargs="?", help="text query (or use --image)")
    parser.add_argument("--image", type=Path, help="example image (PNG, JPEG or DICOM) instead of a text")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--html", type=Path, help="write an HTML contact sheet of the results")
    add_siglip_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise InputError("give either a text query or --image FILE")
    with ImageIndex(args.index) as index:
        print_notice()
        encoder = load_encoder(args)
        if index.info.get("fingerprint") not in (None, encoder.fingerprint):
            raise ConfigError(f"{args.index.name} was built with another model; search it with the same --model")
        vector = encoder.embed_texts([args.query]) if args.query is not None else encoder.embed_images([args.image])
        hits = index.search(vector, args.top_k)[0]
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, "score": round(hit.score, 6), "path": hit.path, "format": hit.format,
                              "meta": hit.meta}))
        else:
            print(f"{rank:>3}  {hit.score:7.4f}  {hit.path}")
    if args.html:
        query = args.query if args.query is not None else f"image {args.image.name}"
        write_contact_sheet(query, hits, args.html)
        print(f"wrote {args.html}")
    return 0
