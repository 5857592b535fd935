"""`medgem dicom info|preview`: look at a DICOM file or series the way the model will.

info reads the header only (fast; preview is what decodes pixels) and prints the de-identified
technical summary (medgem.inputs.deid.safe_summary), never a name, ID, date or institution.
preview writes the rendered pixels: one image as a PNG at native resolution; several (a series
folder or a multi-frame file) as one contact sheet PNG, row-major in patient order, each slice
fitted in a --size square (default 256). A sheet is one file that opens anywhere; the model itself
receives the separate images at native resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medgem import progress
from medgem.cli.common import WINDOW_HELP, int_at_least, positive_int, print_notice
from medgem.errors import InputError
from medgem.inputs.deid import safe_summary
from medgem.inputs.dicom import DEFAULT_SLICES, read_dicom, read_series
from medgem.inputs.images import contact_sheet, load_image, load_images_from_path
from medgem.inputs.volume import MAX_SLICES, VOLUME_RECIPES, load_volume

_SHEET_TILE = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dicom",
        help="inspect and preview DICOM files and series",
        description="Inspect DICOM files without showing identifiers, and preview what the model sees.",
    )
    actions = parser.add_subparsers(dest="dicom_action", metavar="ACTION", required=True)

    info = actions.add_parser(
        "info",
        help="de-identified header summary",
        description="Print the technical header summary of a DICOM file or series folder, after "
        "de-identification (no names, IDs, dates or institutions).",
    )
    info.add_argument("path", metavar="FILE_OR_DIR", help="DICOM file, or a folder holding one series")
    info.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    info.set_defaults(func=run_info)

    preview = actions.add_parser(
        "preview",
        help="render what the model will see to a PNG",
        description="Render a DICOM file, multi-frame file or series folder to PNG exactly as the model "
        "receives it. Several images are written as one contact sheet (row-major, patient order).",
    )
    preview.add_argument("path", metavar="FILE_OR_DIR", help="DICOM/PNG/JPEG file or a series folder")
    preview.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    preview.add_argument("--window", default=None, help=WINDOW_HELP)
    preview.add_argument("--frame", type=int_at_least(0), default=None, help="one frame of a multi-frame file (from 0)")
    preview.add_argument(
        "--slices",
        type=positive_int,
        default=None,
        help=f"evenly spaced slices/frames to show (default {DEFAULT_SLICES}; any number)",
    )
    preview.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help=f"longest side of a single image, or of each sheet tile (default: native, "
        f"or {_SHEET_TILE} on a sheet)",
    )
    preview.add_argument("--recipe", default=None, choices=list(VOLUME_RECIPES),
                         help="show the exact slices and colours a MedGemma 1.5 recipe sends (ct: three HU "
                         "windows as RGB; mri: whole-volume min-max), labelled SLICE n as in the prompt; "
                         "--slices is then the most slices (default 85)")
    preview.add_argument("--series", default=None, metavar="UID", help="with --recipe: the series to read from a "
                         "folder that holds several")
    preview.set_defaults(func=run_preview)


def run_info(args: argparse.Namespace) -> int:
    print_notice()
    if Path(args.path).is_dir():
        slices, method = read_series(args.path, progress=progress.enabled())
        summary = {"slices": len(slices), "sorted_by": method, **safe_summary(slices[0])}
    else:
        summary = safe_summary(read_dicom(args.path, pixels=False))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{key:<{width}}  {'-' if shown is None or shown == '' else shown}")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    print_notice()
    if args.frame is not None and args.slices is not None:
        raise InputError("give --frame or --slices, not both")
    if args.output.suffix.lower() != ".png":
        raise InputError(f"{args.output.name}: the preview is written as PNG; name the output *.png")
    if args.recipe is not None:
        return _preview_recipe(args)
    if args.series is not None:
        raise InputError("--series goes with --recipe")
    if args.frame is not None:
        images = [load_image(args.path, args.window, frame=args.frame)]
    else:
        images = load_images_from_path(
            args.path, args.slices or DEFAULT_SLICES, window=args.window, progress=progress.enabled()
        )
    if len(images) == 1:
        picture = images[0]
        if args.size:
            picture.thumbnail((args.size, args.size))
    else:
        picture = contact_sheet(images, args.size or _SHEET_TILE)
    try:
        picture.save(args.output, format="PNG")
    except OSError as exc:
        raise InputError(f"cannot write {args.output.name} ({type(exc).__name__})") from None
    layout = "one image" if len(images) == 1 else f"contact sheet of {len(images)} images"
    print(f"wrote {args.output} ({layout}, {picture.width}x{picture.height}, window {args.window or 'auto'})")
    return 0


def _preview_recipe(args: argparse.Namespace) -> int:
    """The contact sheet of a volume recipe: its slices, in prompt order, each labelled as in the prompt."""
    if args.window is not None or args.frame is not None:
        raise InputError("--window and --frame do not combine with --recipe: the recipe picks slices and colours")
    volume = load_volume(args.path, args.recipe, args.slices or MAX_SLICES, args.series, progress=True)
    for note in volume.warnings:
        print(f"medgem: warning: {note}", file=sys.stderr)
    labels = [f"SLICE {n}" for n in range(1, len(volume.images) + 1)]
    picture = contact_sheet(volume.images, args.size or _SHEET_TILE, labels)
    try:
        picture.save(args.output, format="PNG")
    except OSError as exc:
        raise InputError(f"cannot write {args.output.name} ({type(exc).__name__})") from None
    print(f"wrote {args.output} (recipe {args.recipe}: {len(volume.images)} of {volume.total} slices sorted by "
          f"{volume.sorted_by}, labelled SLICE 1..{len(volume.images)}; {picture.width}x{picture.height})")
    return 0
