"""`medgem probe train|predict|curve`: linear probes on frozen SigLIP image embeddings.

train fits a logistic regression on the images of a CSV (`path,label`) and saves it as JSON; predict
applies it; curve measures AUC against the number of labelled images per class (JSON + PNG plot).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgem import progress
from medgem.cli.common import print_notice
from medgem.cli.embed import add_siglip_args, load_encoder
from medgem.errors import ConfigError, InputError
from medgem.retrieval import probe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe classifiers on SigLIP embeddings",
        description="Data-efficient classification: logistic regression on frozen SigLIP/MedSigLIP image embeddings.",
    )
    actions = parser.add_subparsers(dest="probe_action", metavar="ACTION", required=True)

    train = actions.add_parser("train", help="fit a probe on labelled images",
                               description="Fit a probe on DATA.csv (columns path,label; paths relative to the CSV).")
    train.add_argument("data", type=Path, metavar="DATA.csv")
    train.add_argument("-o", "--output", type=Path, default=Path("probe.json"), help="probe file (default probe.json)")
    train.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength (default 1.0)")
    add_siglip_args(train)
    train.set_defaults(func=run_train)

    predict = actions.add_parser("predict", help="classify images with a saved probe",
                                 description="Classify images with a probe from `medgem probe train`.")
    predict.add_argument("probe", type=Path, metavar="PROBE.json")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_siglip_args(predict)
    predict.set_defaults(func=run_predict)

    curve = actions.add_parser("curve", help="few-shot learning curve (AUC vs images per class)",
                               description="AUC on a fixed stratified test split for n = 1, 2, 4, 8, ... training "
                               "images per class, several random draws each. Writes JSON and a PNG plot.")
    curve.add_argument("data", type=Path, metavar="DATA.csv")
    curve.add_argument("-o", "--output", type=Path, default=Path("learning_curve.json"))
    curve.add_argument("--png", type=Path, default=None, help="plot file (default: next to --output)")
    curve.add_argument("--shots", default=None, help="comma-separated n per class (default 1,2,4,... as data allow)")
    curve.add_argument("--repeats", type=int, default=5, help="random draws per n (default 5)")
    curve.add_argument("--test-fraction", type=float, default=0.3)
    curve.add_argument("--C", type=float, default=1.0)
    add_siglip_args(curve)
    curve.set_defaults(func=run_curve)


def _embed(args: argparse.Namespace, images: list[str]):
    encoder = load_encoder(args)
    return encoder, encoder.embed_images(images, batch_size=args.batch_size, progress=progress.enabled())


def run_train(args: argparse.Namespace) -> int:
    images, labels = probe.read_labelled(args.data)
    print_notice()
    encoder, embeddings = _embed(args, images)
    fitted = probe.train_probe(embeddings, labels, encoder.fingerprint, C=args.C)
    fitted.save(args.output)
    print(f"probe with {len(fitted.classes)} classes ({', '.join(fitted.classes)}) trained on {len(images)} "
          f"images; saved to {args.output}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    fitted = probe.Probe.load(args.probe)
    print_notice()
    encoder, embeddings = _embed(args, args.images)
    if encoder.fingerprint != fitted.fingerprint:
        raise ConfigError(f"{args.probe.name} was trained on another model's embeddings; use the same --model")
    probs = fitted.predict_proba(embeddings)
    for image, row in zip(args.images, probs):
        top = fitted.classes[int(row.argmax())]
        if args.json:
            print(json.dumps({"image": image, "label": top,
                              "probabilities": {c: round(float(p), 6) for c, p in zip(fitted.classes, row)}}))
        else:
            print(f"{image}\t{top}\t{row.max():.1%}")
    return 0


def run_curve(args: argparse.Namespace) -> int:
    try:
        shots = [int(n) for n in args.shots.split(",")] if args.shots else None
    except ValueError:
        raise InputError(f"--shots must be comma-separated integers, got {args.shots!r}") from None
    if not 0 < args.test_fraction < 1 or args.repeats < 1:
        raise InputError("--test-fraction must be between 0 and 1 and --repeats at least 1")
    images, labels = probe.read_labelled(args.data)
    print_notice()
    encoder, embeddings = _embed(args, images)
    curve = probe.learning_curve(embeddings, labels, shots, repeats=args.repeats, test_fraction=args.test_fraction,
                                 C=args.C)
    curve["model"] = {"source": encoder.source, "fingerprint": encoder.fingerprint}
    args.output.write_text(json.dumps(curve, indent=2) + "\n")
    png = args.png or args.output.with_suffix(".png")
    probe.plot_curve(curve, png)
    for point in curve["points"]:
        print(f"n={point['n_per_class']:>4} per class  AUC {point['auc_mean']:.3f} ± {point['auc_std']:.3f}")
    print(f"wrote {args.output} and {png}")
    return 0
