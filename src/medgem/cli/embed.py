"""`medgem embed`: SigLIP / MedSigLIP embeddings of images and texts, to a .npy file or JSON lines.

Also home of the model flags every SigLIP subcommand shares (classify, probe, index, search):
`--model` (a MedSigLIP folder; default $MEDGEM_SIGLIP_MODEL), `--dtype`, `--device`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from medgem import progress
from medgem.cli.common import print_notice
from medgem.errors import ConfigError, InputError


def add_siglip_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=os.environ.get("MEDGEM_SIGLIP_MODEL"),
        help="SigLIP/MedSigLIP HF folder, e.g. a download of google/medsiglip-448 (default: $MEDGEM_SIGLIP_MODEL)",
    )
    parser.add_argument("--dtype", default=os.environ.get("MEDGEM_DTYPE"), choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=os.environ.get("MEDGEM_DEVICE", "cpu"))
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")


def load_encoder(args: argparse.Namespace):
    """The SigLIP encoder named by the model flags."""
    import medgem

    if not args.model:
        raise ConfigError("no SigLIP model: pass --model FOLDER (a MedSigLIP checkpoint) or set MEDGEM_SIGLIP_MODEL")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    with progress.step(f"loading {args.model}"):
        return medgem.load_siglip(args.model, dtype=args.dtype, device=args.device)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="SigLIP embeddings of images and texts",
        description="Embed images (PNG, JPEG, DICOM) and/or texts with a SigLIP/MedSigLIP model. Vectors are "
        "unit length, so a dot product is a cosine similarity. Writes a .npy matrix (rows: images, then texts) "
        "or prints JSON lines.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    parser.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    parser.add_argument("-o", "--output", type=Path, help=".npy file for the [N, D] float32 matrix")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    add_siglip_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.images and not args.text:
        raise InputError("nothing to embed: give image files and/or --text")
    if not args.output and not args.json:
        raise InputError("say where the vectors go: --output FILE.npy and/or --json")
    print_notice()
    encoder = load_encoder(args)
    vectors = np.concatenate([
        encoder.embed_images(args.images, batch_size=args.batch_size,
                             progress=len(args.images) > args.batch_size and progress.enabled()),
        encoder.embed_texts(args.text),
    ])
    if args.output:
        np.save(args.output, vectors)
    if args.json:
        sources = [{"image": p} for p in args.images] + [{"text": t} for t in args.text]
        for source, vector in zip(sources, vectors):
            print(json.dumps({**source, "embedding": [round(float(v), 6) for v in vector]}))
    else:
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}")
    return 0
