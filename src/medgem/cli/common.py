"""Flags and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
import sys

from medgem import progress
from medgem.inputs.dicom import WINDOW_PRESETS
from medgem.notice import NOTICE

WINDOW_HELP = (
    "VOI window: a CT preset ("
    + ", ".join(f"{name} {c:g}/{w:g}" for name, (c, w) in WINDOW_PRESETS.items())
    + " HU as center/width; CT only), CENTER/WIDTH (write --window=-500/2000 when the center is negative), "
    "'minmax', or 'auto' = the file's own window (default)"
)


def int_at_least(low: int):
    """An argparse type for counts and sizes: below `low` is refused with exit 2 (--size 0 gave a blank image)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


positive_int = int_at_least(1)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --dtype / --device, defaulting to the embedded model and MEDGEM_* variables."""
    parser.add_argument(
        "--model",
        default=os.environ.get("MEDGEM_MODEL"),
        help="HF folder, .gguf file or hub id (default: the embedded Gemma 3 270M)",
    )
    parser.add_argument("--mmproj", default=None, help="llama.cpp mmproj GGUF with the vision tower")
    parser.add_argument("--dtype", default=os.environ.get("MEDGEM_DTYPE"), choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=os.environ.get("MEDGEM_DEVICE", "cpu"))
    parser.add_argument("--quant", default=os.environ.get("MEDGEM_QUANT"), choices=["none", "int8", "int4", "gguf"],
                        help="weight-only quantization of the text decoder; gguf keeps a GGUF's blocks as stored "
                        "(default on CPU unless --dtype is given: gguf for a GGUF over 1 GiB, else int8; none "
                        "elsewhere)")
    parser.add_argument("--compile", action="store_true",
                        help="run the decoder through torch.compile: faster decoding after 12-70 s of compiling")
    parser.add_argument("--draft", default=None, metavar="MODEL|lookup",
                        help="speculative decoding: a small model with the same tokenizer proposes tokens that "
                        "--model checks (e.g. the embedded 270M, 'embedded', for a bigger Gemma 3 / MedGemma), "
                        "or 'lookup': tokens copied from earlier in the text (no second model; pays for "
                        "summaries and extraction); same output, faster when the guesses are often right")
    parser.add_argument("--draft-tokens", type=int, default=None,
                        help="most tokens proposed per step (default 4 for a draft model, 8 for lookup)")


def load_from_args(args: argparse.Namespace):
    """The pipeline named by the model flags."""
    import medgem
    from medgem.pipeline import add_draft

    with progress.step(f"loading {args.model or 'the embedded Gemma 3 270M'}"):
        pipe = medgem.load(args.model, mmproj=args.mmproj, dtype=args.dtype, device=args.device, quant=args.quant)
    if getattr(args, "compile", False):
        pipe.compile()
    if getattr(args, "draft", None):
        with progress.step(f"loading the draft ({args.draft})"):
            add_draft(pipe, args.draft, args.draft_tokens, dtype=args.dtype, device=args.device, quant=args.quant)
    return pipe


def print_notice() -> None:
    print(f"[{NOTICE}]", file=sys.stderr)
