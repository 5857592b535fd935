"""`medgem bench`: prefill and decode speed, load time and peak memory of a model on this machine.

It loads the model with the same flags as `generate` and `serve` (--quant, --dtype, --compile,
--draft), so the numbers are the ones those commands will get. Peers (llama.cpp, transformers) side by
side: benchmarks/decode.py in the source tree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgem import progress
from medgem.cli.common import add_model_args, load_from_args, print_notice


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill/decode speed, load time and peak memory here",
        description="Greedy generation of a fixed clinical-style prompt (no patient data), timed the way "
        "benchmarks/decode.py times every engine: prefill tok/s = prompt tokens / time to the first token, "
        "decode tok/s = (new tokens - 1) / time of the rest, median of --runs runs after a warm-up.",
    )
    add_model_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length to prefill")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to decode each run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from medgem.bench import bench_pipeline, check_sizes
    from medgem.engine.slots import activation_dtype

    print_notice()
    check_sizes(args.prompt_tokens, args.new_tokens, args.runs)
    pipe = load_from_args(args)
    text = getattr(pipe.model, "language_model", pipe.model)
    result = {
        "model": pipe.source, "quant": getattr(text, "quantization", "none"),
        "dtype": str(activation_dtype(pipe.model)).removeprefix("torch."),
        "compiled": pipe.compiled, "draft": args.draft, "threads": torch.get_num_threads(),
    }
    with progress.step(f"benchmarking: a warm-up and {args.runs} runs of {args.prompt_tokens} + {args.new_tokens} tokens"):
        result.update(bench_pipeline(pipe, args.prompt_tokens, args.new_tokens, args.runs))
    for key, value in result.items():
        print(f"{key:>28}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
