"""`medgem serve`: an OpenAI-compatible HTTP API and a web page for one model (see medgem.serve)."""

from __future__ import annotations

import argparse
import logging
import os

from medgem.cli.common import add_model_args, print_notice
from medgem.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from medgem.serve.settings import Limits

    d = Limits()
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API, with a web page",
        description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, /ready, "
        "/metrics and a chat page at /. Images and DICOM go in as data: URIs. Not a medical device.",
    )
    add_model_args(parser)
    parser.add_argument("--model-name", default=os.environ.get("MEDGEM_MODEL_NAME"),
                        help="the model id clients send (default: the checkpoint's name)")
    parser.add_argument("--embedding-model", default=os.environ.get("MEDGEM_EMBEDDING_MODEL"), metavar="FOLDER",
                        help="a MedSigLIP folder to serve on /v1/embeddings (texts and images)")
    parser.add_argument("--host", default=os.environ.get("MEDGEM_HOST", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; other addresses need API keys)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MEDGEM_PORT", "8000")), help="port to listen on")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="accept this bearer key (repeatable; default: MEDGEM_API_KEYS, comma separated)")
    parser.add_argument("--api-key-file", default=os.environ.get("MEDGEM_API_KEY_FILE"), metavar="FILE",
                        help="accept the bearer keys in this file, one a line (with --api-key: both)")
    parser.add_argument("--public", action="append", default=[], choices=["/metrics", "/openapi.json"],
                        help="answer this path without a key (repeatable; by default keys guard it too)")
    parser.add_argument("--rate-limit", type=float, default=0.0, metavar="PER_SECOND",
                        help="requests a second each key may make on average; beyond, 429 (default: off)")
    parser.add_argument("--rate-burst", type=int, default=20, help="requests a key may make at once (default 20)")
    parser.add_argument("--max-tokens-default", type=int, default=None,
                        help=f"tokens generated when a request omits max_tokens (default {d.default_max_tokens}, "
                        "at most --max-tokens)")
    parser.add_argument("--default-temperature", type=float, default=1.0, metavar="T",
                        help="temperature of requests that omit it (OpenAI's default is 1.0; 0 is greedy, which "
                        "suits a base model such as the embedded 270M)")
    parser.add_argument("--no-access-log", action="store_true",
                        help="no per-request line (method, route, status, tokens, ms; never the prompt) on stderr")
    parser.add_argument("--request-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="a generation taking longer is cancelled and answered 504 (default: no limit)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser calls from this origin (repeatable; CORS is off by default)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="sequences that may wait; beyond, 429 (default 64)")
    parser.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body limit")
    parser.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="pixels per image")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="prompt tokens per request")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="the most max_tokens a request may ask")
    parser.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                        help="whether the model has MedGemma 27B's thinking mode (auto: the 27B architecture)")
    parser.add_argument("--drain-seconds", type=float, default=60.0,
                        help="on SIGTERM, how long in-flight requests may take to finish (default 60)")
    parser.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve (pip install 'ray[serve]')")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    parser.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):
    from medgem.serve.settings import Limits, ServeSettings, keys_from_env, keys_from_file

    if args.max_tokens_default is None:
        args.max_tokens_default = min(Limits().default_max_tokens, args.max_tokens)
    numbers = {"--max-batch": args.max_batch, "--max-images": args.max_images, "--max-tokens": args.max_tokens,
               "--max-prompt-tokens": args.max_prompt_tokens, "--max-image-pixels": args.max_image_pixels,
               "--replicas": args.replicas, "--max-tokens-default": args.max_tokens_default,
               "--rate-burst": args.rate_burst}
    for flag, value in numbers.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    if args.max_queue < 0 or args.max_body_mb <= 0:
        raise ConfigError("--max-queue must be >= 0 and --max-body-mb > 0")
    if args.rate_limit < 0 or args.request_timeout < 0 or args.default_temperature < 0:
        raise ConfigError("--rate-limit, --request-timeout and --default-temperature must be >= 0")
    from medgem.weights import check_device

    check_device(args.device)  # here, not in the background load, where the error would only be logged
    if args.max_tokens_default > args.max_tokens:
        raise ConfigError(f"--max-tokens-default must be at most --max-tokens ({args.max_tokens})")
    keys = (*(args.api_key or ()), *(keys_from_file(args.api_key_file) if args.api_key_file else ()))
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1-65535 (got {args.port})")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, default_max_tokens=args.max_tokens_default)
    return ServeSettings(
        model=args.model, mmproj=args.mmproj, dtype=args.dtype, device=args.device, quant=args.quant,
        draft=args.draft, draft_tokens=args.draft_tokens, compile=args.compile,
        model_name=args.model_name, embedding_model=args.embedding_model,
        host=args.host, port=args.port, api_keys=keys or keys_from_env(),
        cors_origins=tuple(args.cors_origin), limits=limits, max_batch=args.max_batch, max_queue=args.max_queue,
        drain_seconds=args.drain_seconds, thinking=args.thinking, public_paths=tuple(args.public),
        rate_limit=args.rate_limit, rate_burst=args.rate_burst, request_timeout=args.request_timeout,
        default_temperature=args.default_temperature,
        debug=args.debug or os.environ.get("MEDGEM_DEBUG") == "1",
    )


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    print_notice()
    if not args.no_access_log:
        from medgem.serve.app import access_log

        access_log.setLevel(logging.INFO)
    if args.ray:
        from medgem.serve import ray_app

        ray_app.run(settings, args.replicas, args.cpus_per_replica, args.ray_address)
        return 0
    from medgem.serve.app import run

    print(f"medgem: serving on http://{settings.host}:{settings.port} (model loads in the background; "
          "GET /ready says when it is up)", flush=True)
    run(settings)
    return 0
