"""Server settings: what to load, where to listen, who may call, and the limits on each request.

One frozen dataclass, filled from CLI flags (which default to `MEDGEM_*` variables), so the same
object configures a local uvicorn server and every Ray Serve replica (it pickles).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from medgem.errors import ConfigError


def keys_from_env() -> tuple[str, ...]:
    """API keys from MEDGEM_API_KEYS (comma separated); empty when unset."""
    return tuple(k.strip() for k in os.environ.get("MEDGEM_API_KEYS", "").split(",") if k.strip())


def keys_from_file(path: str) -> tuple[str, ...]:
    """API keys from a file, one a line (blank lines and # comments skipped); the file is named, never quoted."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            keys = tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    except FileNotFoundError:
        raise ConfigError(f"--api-key-file {os.path.abspath(path)}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file {name}: cannot read it ({type(exc).__name__})") from None
    if not keys:
        raise ConfigError(f"--api-key-file {name}: holds no key")
    return keys


# Routes that never need a key (probes and the page, and /static/*); /metrics and /openapi.json may be added.
ALWAYS_PUBLIC = ("/health", "/ready", "/", "/favicon.ico")
MAY_BE_PUBLIC = ("/metrics", "/openapi.json")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Each breach is a 4xx with an OpenAI-shaped error, never a 500."""

    max_body_bytes: int = 32 * 1024 * 1024  # a 16-bit chest radiograph DICOM is ~7 MB, ~10 MB as base64
    max_images: int = 8  # each image costs the model 256 tokens
    max_image_pixels: int = 40_000_000  # per image (rows x columns x frames); 2-3x a mammogram
    max_prompt_tokens: int = 4096  # also capped by the model's context
    max_tokens: int = 2048  # the most a request may ask for (max_tokens / max_completion_tokens)
    default_max_tokens: int = 512  # when a request does not say
    max_n: int = 4  # choices per request


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None  # None: the embedded Gemma 3 270M
    mmproj: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    quant: str | None = None  # None: medgem.load's default (int8 on CPU unless a dtype is given)
    draft: str | None = None  # speculative decoding: a draft model path, "embedded" (the 270M) or "lookup"
    draft_tokens: int | None = None  # None: DRAFT_TOKENS in pipeline.py
    compile: bool = False  # torch.compile the model: faster decoding after a long first request
    model_name: str | None = None  # the id clients send as `model`; default derived from the source
    embedding_model: str | None = None  # a MedSigLIP folder for /v1/embeddings (its folder name is its id)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are named
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # sequences waiting for a batch; beyond this, 429
    drain_seconds: float = 60.0  # on SIGTERM/SIGINT: how long in-flight requests may take to finish
    thinking: str = "auto"  # auto (MedGemma 27B shapes) | on | off: whether the model has a thinking mode
    public_paths: tuple[str, ...] = ()  # of "/metrics", "/openapi.json": answered without a key
    rate_limit: float = 0.0  # requests per second per key (token bucket); 0: off
    rate_burst: int = 20  # the bucket's size: requests a key may send at once
    request_timeout: float = 0.0  # seconds a generation request may take before 504; 0: no limit
    default_temperature: float = 1.0  # for requests that omit temperature (OpenAI's default; 0 is greedy)
    debug: bool = False  # log tracebacks of internal errors

    def __post_init__(self) -> None:
        if self.thinking not in ("auto", "on", "off"):
            raise ConfigError(f"thinking must be auto, on or off (got {self.thinking!r})")
        if set(self.public_paths) - set(MAY_BE_PUBLIC):
            raise ConfigError(f"public_paths may hold {', '.join(MAY_BE_PUBLIC)} only")
