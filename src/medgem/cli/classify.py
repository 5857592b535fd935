"""`medgem classify`: zero-shot classification of images with a SigLIP/MedSigLIP model.

Each label is put into the template ("a {} medical image" by default) and compared with each image.
By default the probabilities are a softmax over the labels (one answer per image); --multilabel gives
each label's own sigmoid instead.
"""

from __future__ import annotations

import argparse
import json

from medgem.cli.common import print_notice
from medgem.cli.embed import add_siglip_args, load_encoder
from medgem.errors import InputError
from medgem.siglip import DEFAULT_TEMPLATE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="zero-shot image classification (SigLIP/MedSigLIP)",
        description="Score images against text labels with no training. Example: medgem classify --model "
        "medsiglip-448 --labels 'pneumothorax,no pneumothorax' chest.dcm",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--labels", required=True, help="comma-separated labels")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt template, '{{}}' = label (default {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--multilabel", action="store_true", help="independent sigmoid per label instead of a softmax")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_siglip_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < (1 if args.multilabel else 2):
        raise InputError("--labels needs at least two comma-separated labels (or --multilabel)")
    print_notice()
    encoder = load_encoder(args)
    probs = encoder.zero_shot(args.images, labels, args.template, multilabel=args.multilabel, batch_size=args.batch_size)
    if args.json:
        for image, row in zip(args.images, probs):
            scores = {label: round(float(p), 6) for label, p in zip(labels, row)}
            print(json.dumps({"image": image, "top": labels[int(row.argmax())], "probabilities": scores}))
        return 0
    width = max(len(label) for label in labels)
    for image, row in zip(args.images, probs):
        print(image)
        for label, p in sorted(zip(labels, row), key=lambda lp: -lp[1]):
            print(f"  {label:<{width}}  {p:6.1%}")
    return 0
