"""The `medgem` command: one entry point, one module per subcommand group.

Each module in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parsers and sets
`func(args) -> int`. Every error a user can cause (a bad flag, a mistyped command, a missing file, a
`MedgemError`) goes through one path: one line on stderr naming the input and the fix, exit 2; `--debug`
shows tracebacks.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from medgem.errors import MedgemError

# Module names under medgem.cli, in the order `medgem --help` lists them.
SUBCOMMANDS = ["generate", "serve", "bench", "dicom", "eval", "ehr", "finetune", "embed", "classify", "probe", "index",
               "search"]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in --help, unless it has none worth saying or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text or not _worth_showing(action.default):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and _worth_showing(action.default):
            action.help = "(default: %(default)s)"  # an option without help still shows its default
        return super()._format_action(action)


def _worth_showing(default: object) -> bool:
    """A default --help states: not None, a switch's False, an empty list or text, or SUPPRESS."""
    return not (default is None or default is False or default is argparse.SUPPRESS or default in ([], ""))


class Parser(argparse.ArgumentParser):
    """argparse with medgem's error path: one line, the command it came from, and a close match when a
    subcommand or flag is mistyped (`--max-tokens` -> `--max-new-tokens`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        where = "" if self.prog == "medgem" else f"{self.prog}: "
        print(f"medgem: error: {where}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentError(action, f"invalid choice {value!r} (choose from {', '.join(choices)}){hint}")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            leaf: argparse.ArgumentParser = getattr(parsed, "_parser", self)
            leaf.error(unknown_arguments(leaf, extras))
        return parsed


def unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The message for arguments no parser took: the first unknown flag with its closest known flag."""
    flags = [e for e in extras if e.startswith("-") and e != "-"]
    if not flags:
        return f"unexpected argument {extras[0]!r}" + (f" and {len(extras) - 1} more" if len(extras) > 1 else "")
    name = flags[0].split("=", 1)[0]
    close = difflib.get_close_matches(name, [o for o in parser._option_string_actions if o.startswith("--")], n=1,
                                      cutoff=0.6)
    return f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else "")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="medgem",
        description="Run, serve, fine-tune, embed with and evaluate MedGemma-family models. "
        "Not a medical device: outputs need review by a qualified professional.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"medgem.cli.{name}").register(sub)
    _add_common(sub)
    return parser


def _add_common(subparsers: argparse._SubParsersAction) -> None:
    """`--threads` and `--quiet` on every command, however deeply nested (`medgem dicom info --threads 1`),
    and the leaf parser in the namespace, so an unknown flag is matched against that command's own flags."""
    for command in subparsers.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for group in nested:
            _add_common(group)
        if nested:
            continue
        if "--threads" not in command._option_string_actions:
            command.add_argument("--threads", type=int, default=None,
                                 help="CPU threads for the model's kernels (default: the physical cores)")
        command.add_argument("--quiet", "-q", action="store_true",
                             help="no progress spinner on the terminal (also MEDGEM_QUIET=1)")
        command.set_defaults(_parser=command)


def user_os_error(exc: OSError) -> str | None:
    """The one-line message for a file problem the user can fix (missing, unreadable, a folder, a full disk),
    with the full path; None for OS errors that are not about a file the user named."""
    if exc.filename is None:
        return None
    path = Path(os.fsdecode(exc.filename)).expanduser().absolute()
    fixes = {FileNotFoundError: "no such file or folder", PermissionError: "permission denied (check its mode)",
             IsADirectoryError: "is a folder, not a file", NotADirectoryError: "a part of this path is not a folder"}
    reason = next((text for kind, text in fixes.items() if isinstance(exc, kind)), exc.strerror or str(exc))
    return f"{path}: {reason}"


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
        from medgem import progress, threads

        progress.configure(quiet=getattr(args, "quiet", False))
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
    except OSError as exc:
        message = user_os_error(exc)
        if debug or message is None:
            return _internal(exc, debug)
        print(f"medgem: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the face never shows a traceback unless asked
        return _internal(exc, debug)


def _internal(exc: Exception, debug: bool) -> int:
    """A bug, not the user's doing: one line naming the exception (a traceback with --debug), exit 1."""
    if debug:
        raise exc
    print(f"medgem: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
    return 1
