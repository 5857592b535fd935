"""`medgem generate` (one completion) and `medgem chat` (one shot or a REPL with history)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medgem import progress
from medgem.cli.common import WINDOW_HELP, add_model_args, load_from_args, print_notice
from medgem.cli.recipes import add_recipe_args, check_recipe_args, run_recipe
from medgem.errors import InputError
from medgem.inputs.text import check_depth, clean_text, read_text


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system instruction (folded into the first user turn)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens up to this mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep only the k likeliest tokens (0 = all)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top one")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: text, ids, timings, tok/s")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="constrain the output to JSON that validates against this JSON Schema file")
    shape.add_argument("--regex", default=None, help="constrain the output to match this regular expression")
    shape.add_argument("--choice", default=None, metavar="A,B,C",
                       help="constrain the output to exactly one of these comma-separated strings")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def constraint_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema / --regex / --choice as the pipeline's constraint keyword (checked before loading)."""
    from medgem.engine.constraints import Constraint

    if args.json_schema:
        name = f"--json-schema {Path(args.json_schema).name}"
        text = read_text(args.json_schema, name)
        check_depth(text, name)
        Constraint.json_schema(text).check()
        return {"json_schema": text}
    if args.regex is not None:
        Constraint.regex(args.regex).check()
        return {"regex": args.regex}
    if args.choice is not None:
        options = [c.strip() for c in args.choice.split(",") if c.strip()]
        Constraint.choice(options).check()
        return {"choice": options}
    return {}


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate a completion for a prompt",
                         description="Generate text. Uses the chat template unless --raw.")
    gen.add_argument("prompt", help="prompt text ('-' reads standard input)")
    gen.add_argument("--raw", action="store_true", help="plain completion, no chat template (best for base models)")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser("chat", help="chat with the model (REPL, or one shot with a question)",
                          description="Chat. With a question: answer once. Without: an interactive session; "
                          "/reset clears history, /exit quits.")
    chat.add_argument("question", nargs="?", default=None)
    chat.add_argument("--image", action="append", default=[], metavar="FILE_OR_DIR",
                      help="image, DICOM file, or DICOM series folder (repeatable)")
    chat.add_argument("--window", default=None, help=f"with --image: {WINDOW_HELP}")
    chat.add_argument("--slices", type=int, default=None,
                      help="with --image: slices to take from a DICOM series or multi-frame file "
                           "(with --recipe ct/mri: at most this many, default 85)")
    add_recipe_args(chat)
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _report(pipe, completion, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """The accounting after an answer: one JSON object (with `extra`'s fields), or one line on stderr."""
    if as_json:
        print(json.dumps({
            **(extra or {}),
            "model": pipe.source,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason,
            "timings": {"load_s": round(pipe.load_seconds, 3), "prefill_s": round(completion.prefill_seconds, 4),
                        "decode_s": round(completion.decode_seconds, 4)},
            "prefill_tok_per_s": round(completion.prompt_tokens / max(completion.prefill_seconds, 1e-9), 1),
            "decode_tok_per_s": round(completion.decode_tok_per_s, 2),
        }))
    else:
        print(f"\n[{completion.completion_tokens} tokens, {completion.decode_tok_per_s:.1f} tok/s]", file=sys.stderr)


def _stream(pipe, prompt, args, raw: bool) -> str:
    """Print the answer as it is generated (or as JSON at the end); return its text."""
    kwargs = {**sampling_kwargs(args), **constraint_kwargs(args)}
    if args.json:
        with progress.step("generating"):
            completion = pipe.complete([prompt], raw=raw, system=args.system, **kwargs)[0]
        _report(pipe, completion, True)
        return completion.text
    for piece in pipe.stream(prompt, raw=raw, system=args.system, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    _report(pipe, pipe.last_completion, False)
    return pipe.last_completion.text


def run_generate(args: argparse.Namespace) -> int:
    # Text enters here: argv may carry surrogates (non-UTF-8 bytes) and stdin any bytes; both become text
    # the tokenizer takes (sentencepiece raises TypeError on a lone surrogate).
    prompt = clean_text(sys.stdin.buffer.read().decode("utf-8", "replace") if args.prompt == "-" else args.prompt)
    args.system = clean_text(args.system) if args.system else args.system
    if not prompt.strip():
        raise InputError("prompt is empty")
    validate_sampling(args)
    print_notice()
    pipe = load_from_args(args)
    if not args.raw:
        hint_base_model(pipe)
    _stream(pipe, prompt, args, raw=args.raw)
    return 0


def hint_base_model(pipe) -> None:
    """A base model answers chat-format prompts with repetitive text; say so once, with the fix, before it does."""
    if pipe.base_model:
        print(f"medgem: note: {pipe.source} is a base model, not instruction-tuned, so chat prompts give "
              "repetitive text; use completion mode: medgem generate --raw \"Sepsis is defined as\"", file=sys.stderr)


def image_parts(paths: list[str], window: str | None, slices: int | None) -> list[dict[str, Any]]:
    """Message parts for --image arguments; a folder or multi-frame file becomes several images."""
    from medgem.inputs.images import load_images_from_path

    parts = []
    for path in paths:
        kwargs = {"window": window} if slices is None else {"window": window, "n_slices": slices}
        for image in load_images_from_path(Path(path), **kwargs):
            parts.append({"type": "image", "image": image})
    return parts


def validate_sampling(args: argparse.Namespace) -> None:
    """Reject bad flags before spending seconds on loading the model."""
    from medgem.engine.sampling import SamplingParams

    SamplingParams(**sampling_kwargs(args))
    constraint_kwargs(args)


def run_chat(args: argparse.Namespace) -> int:
    validate_sampling(args)
    sources = check_recipe_args(args) if args.recipe else None
    if sources is None and not args.image and (args.window is not None or args.slices is not None):
        flag = "--window" if args.window is not None else "--slices"
        raise InputError(f"{flag} applies to --image and no --image was given; add --image FILE or drop {flag}")
    print_notice()
    pipe = load_from_args(args)
    hint_base_model(pipe)
    if sources is not None:
        return run_recipe(args, pipe, sources)
    images = image_parts(args.image, args.window, args.slices) if args.image else []
    history: list[dict[str, Any]] = []

    def ask(question: str) -> None:
        content: Any = question
        if images and not history:  # images belong to the first turn
            content = [*images, {"type": "text", "text": question}]
        history.append({"role": "user", "content": content})
        answer = _stream(pipe, history, args, raw=False)
        history.append({"role": "assistant", "content": answer})

    if args.question is not None:
        if not args.question.strip():
            raise InputError("question is empty")
        ask(args.question)
        return 0
    print("medgem chat: type a question; /reset clears history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            continue
        if line:
            ask(line)
            print()
