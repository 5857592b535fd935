"""`medgem chat --recipe ct|mri|wsi|longitudinal|localize`: MedGemma 1.5's input recipes on the command line.

The recipe builds the one user turn (processing/recipes.py); this face only maps flags to its sources,
prints the volume's warnings, streams the answer (a thought trace never reaches it), and for localize
prints the boxes in the image's pixels, as JSON with --json, and draws them with --boxes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from medgem.errors import InputError
from medgem.inputs.volume import load_volume
from medgem.inputs.wsi import load_patches
from medgem.processing.boxes import Box
from medgem.processing.recipes import MAX_SLICES, RECIPES, recipe


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, choices=list(RECIPES),
                        help="lay the input out as MedGemma 1.5 was trained to read it: " +
                        "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    parser.add_argument("--series", default=None, metavar="UID", help="ct/mri: the series to read from a folder "
                        "that holds several")
    parser.add_argument("--instruction", default=None, help="ct/mri: the text before the slices (default: the "
                        "notebook's instructor prompt)")
    parser.add_argument("--prior", default=None, metavar="FILE", help="longitudinal: the earlier image")
    parser.add_argument("--current", default=None, metavar="FILE", help="longitudinal: the later image")
    parser.add_argument("--boxes", default=None, type=Path, metavar="OUT.png",
                        help="localize: draw the boxes on the image and write it here")
    parser.add_argument("--tissue", default=None, help="wsi: the tissue (e.g. colon)")
    parser.add_argument("--procedure", default=None, help="wsi: the procedure (e.g. biopsy)")
    parser.add_argument("--patches", type=int, default=None, help="wsi: at most this many patches (default 125)")


def check_recipe_args(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's sources from the flags, refused before the model loads when they cannot work."""
    spec = recipe(args.recipe)
    if spec.name == "wsi" and not (args.tissue and args.procedure):
        raise InputError("--recipe wsi needs --tissue and --procedure (e.g. --tissue colon --procedure biopsy)")
    if spec.name != "wsi" and (args.question is None or not args.question.strip()):
        raise InputError(f"--recipe {spec.name} needs a question (for localize: what to find, e.g. 'right clavicle')")
    if args.window is not None:
        raise InputError("--window does not combine with --recipe: the recipe sets the colours the model was trained on")
    if args.boxes is not None and spec.name != "localize":
        raise InputError("--boxes goes with --recipe localize")
    if args.boxes is not None and args.boxes.suffix.lower() != ".png":
        raise InputError(f"{args.boxes.name}: the boxes are drawn as PNG; name the output *.png")
    if spec.name != "longitudinal" and (args.prior or args.current):
        raise InputError("--prior and --current go with --recipe longitudinal")
    if spec.takes != "volume" and (args.series or args.instruction or args.slices):
        raise InputError("--series, --instruction and --slices go with --recipe ct or mri")
    if spec.takes != "slide" and (args.tissue or args.procedure or args.patches):
        raise InputError("--tissue, --procedure and --patches go with --recipe wsi")
    sources: dict[str, Any] = {}
    if spec.name == "longitudinal":
        given = [*args.image, *([args.prior] if args.prior else []), *([args.current] if args.current else [])]
        if len(given) != 2 or (args.image and (args.prior or args.current)):
            raise InputError("--recipe longitudinal needs --prior FILE --current FILE (or two --image, prior first)")
        sources["prior"], sources["current"] = given
    else:
        if len(args.image) != 1:
            what = {"volume": "a series folder, multi-frame DICOM or NIfTI file", "slide": "a slide file or a DICOM WSI folder"}.get(
                spec.takes, "an image")
            raise InputError(f"--recipe {spec.name} takes one --image: {what}")
        sources["source"] = args.image[0]
    if spec.takes == "volume":
        sources.update(series=args.series, instruction=args.instruction, max_slices=args.slices or MAX_SLICES,
                       progress=True)
    if spec.takes == "slide":
        sources.update(tissue=args.tissue, procedure=args.procedure, max_slices=args.patches or spec.max_images,
                       patch_seed=args.seed or 0)
    _preflight(spec.name, spec.takes, sources)
    return sources


class _HeadersRead(Exception):
    """Raised by _preflight's budget: the source was read up to its pixels without a problem."""


def _preflight(name: str, takes: str, sources: dict[str, Any]) -> None:
    """Read a series' headers or a slide's tissue mask before the model loads, so that an empty folder,
    mixed series or a slide with no tissue fail in a second, not after a minute of loading a 4B model; the
    budget (which needs the model) and the pixels wait for the real run."""
    def stop(_: int) -> None:
        raise _HeadersRead

    try:
        if takes == "volume":
            load_volume(sources["source"], name, sources["max_slices"], sources["series"], budget=stop)
        elif takes == "slide":
            load_patches(sources["source"], sources["max_slices"], sources["patch_seed"], budget=stop)
    except _HeadersRead:
        pass


def draw_boxes(image: Image.Image, boxes: list[Box], path: Path) -> None:
    """The boxes in red on the original image, each with its label above it."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 300))
    for box in boxes:
        draw.rectangle([(box.x0, box.y0), (box.x1, box.y1)], outline=(255, 0, 0), width=width)
        if box.label:
            draw.text((box.x0, max(0.0, box.y0 - 4 * width - 10)), box.label, fill=(255, 0, 0))
    try:
        picture.save(path, format="PNG")
    except OSError as exc:
        raise InputError(f"cannot write {path.name} ({type(exc).__name__})") from None


def run_recipe(args: argparse.Namespace, pipe, sources: dict[str, Any]) -> int:
    """Build, answer and report one recipe prompt."""
    from medgem.cli.generate import _report, sampling_kwargs
    from medgem.inputs.images import load_image

    prompt = pipe.recipe_prompt(args.recipe, args.question, max_new_tokens=args.max_new_tokens, **sources)
    for note in prompt.notes:
        print(f"medgem: warning: {note}", file=sys.stderr)
    if prompt.volume is not None:
        v = prompt.volume
        print(f"[{args.recipe}: {len(v.images)} of {v.total} slices, sorted by {v.sorted_by}]", file=sys.stderr)
    if args.json:
        completion = pipe.complete([prompt.messages], system=args.system, **sampling_kwargs(args))[0]
    else:
        for piece in pipe.stream(prompt.messages, system=args.system, **sampling_kwargs(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        completion = pipe.last_completion
    extra: dict[str, Any] = {"recipe": args.recipe, "reasoning": completion.reasoning}
    if prompt.volume is not None:
        extra["slices"] = {"total": prompt.volume.total, "indices": prompt.volume.indices,
                           "positions_mm": prompt.volume.positions, "warnings": prompt.notes}
    if prompt.slide is not None:
        s = prompt.slide
        extra["patches"] = {"level": s.level, "mpp": round(s.mpp, 3), "tissue_patches": s.tissue_patches,
                            "corners": s.corners}
        print(f"[wsi: {len(s.images)} of {s.tissue_patches} tissue patches at level {s.level} ({s.mpp:.2f} um/px)]",
              file=sys.stderr)
    if prompt.padding is not None:
        from medgem.processing.boxes import answer_boxes

        boxes = answer_boxes(completion.text, prompt.padding)
        extra["boxes"] = [b.to_dict() for b in boxes]
        if not args.json:
            print("no boxes found in the answer" if not boxes else "boxes (pixels of the image):", file=sys.stderr)
            for b in boxes:
                print(f"  {b.label or '-'}: x {b.x0:.0f}..{b.x1:.0f}, y {b.y0:.0f}..{b.y1:.0f}", file=sys.stderr)
        if args.boxes is not None:
            draw_boxes(load_image(sources["source"]), boxes, args.boxes)
            print(f"wrote {args.boxes} ({len(boxes)} box(es))", file=sys.stderr)
    _report(pipe, completion, args.json, extra)
    return 0


__all__ = ["add_recipe_args", "check_recipe_args", "draw_boxes", "run_recipe"]
