"""Who may call, and how often: the bearer-key check and a per-key token bucket.

Both run in an ASGI middleware before any body is read, so a caller without a valid key costs the
server a header lookup, never a 32 MiB upload or a JSON parse (see app.py for the order).
"""

from __future__ import annotations

import hmac
import math
import threading
import time

from medgem.serve.errors import APIError
from medgem.serve.settings import ALWAYS_PUBLIC, ServeSettings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def is_public(path: str, settings: ServeSettings) -> bool:
    """Probes, the page and its files never need a key; /metrics and /openapi.json only when configured."""
    if path in settings.public_paths:
        return True
    return path in ALWAYS_PUBLIC or path.startswith("/static/")


def check_key(authorization: str, keys: tuple[str, ...]) -> str:
    """The caller's key, or an APIError 401 (every key compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers=_CHALLENGE)
    given = token.encode("utf-8", "replace")
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]  # no early exit
    if not any(matches):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=_CHALLENGE)
    return keys[matches.index(True)]


class RateLimiter:
    """A token bucket per caller: `rate` requests a second on average, `burst` at once; 429 with Retry-After."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(caller, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[caller] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise APIError(429, "rate limit reached for this API key; retry after the Retry-After seconds",
                               code="rate_limit_exceeded", headers={"Retry-After": str(max(1, wait))})
            self._buckets[caller] = (tokens - 1.0, now)
