"""The `medgem` command: one entry point, one module per subcommand group.

Each module in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parsers and sets
`func(args) -> int`. Errors a user can cause print one line and exit 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from medgem.errors import MedgemError

# Module names under medgem.cli, in the order `medgem --help` lists them.
SUBCOMMANDS = ["generate", "serve", "bench", "dicom", "eval", "ehr", "finetune", "embed", "classify", "probe", "index",
               "search"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgem",
        description="Run, serve, fine-tune, embed with and evaluate MedGemma-family models. "
        "Not a medical device: outputs need review by a qualified professional.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"medgem.cli.{name}").register(sub)
    _add_threads(sub)
    return parser


def _add_threads(subparsers: argparse._SubParsersAction) -> None:
    """`--threads` on every command, however deeply nested (`medgem dicom info --threads 1`)."""
    for command in subparsers.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for group in nested:
            _add_threads(group)
        if not nested and "--threads" not in command._option_string_actions:
            command.add_argument("--threads", type=int, default=None,
                                 help="CPU threads for the model's kernels (default: the physical cores)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MEDGEM_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else os.environ.get("MEDGEM_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from medgem import threads

        threads.configure(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except MedgemError as exc:
        if debug:
            raise
        print(f"medgem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medgem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the face never shows a traceback unless asked
        if debug:
            raise
        print(f"medgem: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 1
