"""The FastAPI app and the uvicorn server around it.

`create_app(settings, pipe, embedder)` builds the app; with `pipe=None` the models load in the background.
Small ASGI middlewares wrap every request, outermost first (`notice`, `gate`, `boundary`, CORS, `auth`,
`body_limit`):
- `notice`: every response carries the X-Medgem-Notice header;
- `boundary`: turns a bug into a 500 (and a slow generation into a 504) without dropping the connection;
- `auth`: the API key and rate limit, from the headers, before any body is read;
- `gate`: counts API requests in flight, refuses new ones with 503 while draining, records request
  metrics by route template and status, and logs one access line per request to `medgem.access`
  (method, route template, status, prompt+completion tokens, ms; never the body);
- `body_limit`: refuses a body over the limit with 413, from Content-Length before reading it, or
  while reading a chunked body; and JSON nested deeper than MAX_JSON_DEPTH with 400 before it is parsed.

`run(settings)` serves the app with `DrainingServer`: on the first SIGTERM/SIGINT, new API requests
get 503 while those in flight finish (up to `drain_seconds`), then uvicorn shuts down; a second
signal shuts down at once.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import sys
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from medgem.inputs.text import MAX_JSON_DEPTH, json_depth
from medgem.notice import NOTICE
from medgem.pipeline import Pipeline
from medgem.serve import errors, routes
from medgem.serve.auth import RateLimiter, check_key, is_public
from medgem.serve.runtime import Runtime
from medgem.serve.settings import ServeSettings, is_loopback

if TYPE_CHECKING:
    from medgem.siglip import SiglipEncoder

log = logging.getLogger(__name__)
# One line per request: method, route template, status, tokens and milliseconds; never a body, prompt or
# key. `medgem serve` shows it (INFO) unless --no-access-log.
access_log = logging.getLogger("medgem.access")

NOTICE_HEADER = (b"x-medgem-notice", NOTICE.encode())
_STATIC = resources.files("medgem.serve") / "static"
# The page loads only its own script and style; images are data: URIs from the preview endpoint.
_PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'"


async def _send_error(send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(errors.error_body(status, message, code=code)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def notice(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_notice(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != NOTICE_HEADER[0]]
                message = {**message, "headers": [*headers, NOTICE_HEADER]}
            await send(message)

        await app(scope, receive, send_with_notice)

    return middleware


def body_limit(app, limit: int):
    async def middleware(scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await app(scope, receive, send)
        too_large = f"the request body is over this server's limit of {limit // 2**20} MiB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, 413, too_large, "body_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_error(send, 413, too_large, "body_too_large")
            if not message.get("more_body"):
                break
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if b"json" in content_type and json_depth(b"".join(chunks)) > MAX_JSON_DEPTH:
            return await _send_error(send, 400, f"the request body is JSON nested deeper than {MAX_JSON_DEPTH} "
                                     "levels", "invalid_json")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await app(scope, replay, send)

    return middleware


def auth(app, rt: Runtime):
    """The key check (and rate limit) from the headers alone, before the body is read or parsed."""
    settings = rt.settings
    limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None

    async def middleware(scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or is_public(scope["path"], settings):
            return await app(scope, receive, send)
        try:
            caller = (check_key(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"),
                                settings.api_keys) if settings.api_keys
                      else (scope.get("client") or ("local",))[0])
            if limiter is not None and scope["path"].startswith("/v1/"):
                limiter.take(caller)
        except errors.APIError as exc:
            return await _send_error(send, exc.status, exc.message, exc.code or "", exc.headers)
        await app(scope, receive, send)

    return middleware


_GENERATION = ("/v1/chat/completions", "/v1/completions")


def boundary(app, rt: Runtime):
    """The last line: a bug becomes a logged exception type, a request id and an OpenAI-shaped 500, and a
    generation past `request_timeout` a 504; neither drops the connection (a stream ends with an error
    event and [DONE]). Starlette's own handler would re-raise, so uvicorn printed a traceback and reset
    the keep-alive connection."""
    timeout = rt.settings.request_timeout or None

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started, streaming = False, False

        async def tracked(message):
            nonlocal started, streaming
            if message["type"] == "http.response.start":
                started = True
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", []))
            await send(message)

        limited = bool(timeout) and scope["path"] in _GENERATION
        try:
            if limited:
                await asyncio.wait_for(app(scope, receive, tracked), timeout)
            else:
                await app(scope, receive, tracked)
            return
        except Exception as exc:  # noqa: BLE001 - the one place a bug is turned into an answer
            if limited and isinstance(exc, TimeoutError):
                status, message, code, headers = 504, (f"the request took longer than this server's limit of "
                                                       f"{timeout:g} s"), "request_timeout", {}
            else:
                rid = errors.log_internal(scope["path"], exc, rt.settings.debug)
                status, message, code = 500, f"internal server error ({type(exc).__name__}); request id {rid}", \
                    "internal_error"
                headers = {"X-Request-Id": rid}
        if not started:
            return await _send_error(send, status, message, code, headers)
        if streaming:  # the headers went out: end the stream the way every stream ends
            event = json.dumps(errors.error_body(status, message, code=code))
            await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                        "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return middleware


def gate(app, rt: Runtime):
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        api = scope["path"].startswith("/v1/")
        if api and rt.draining:
            return await _send_error(send, 503, "the server is shutting down; retry on another instance",
                                     "shutting_down", {"Retry-After": "5", "Connection": "close"})
        start, status = time.perf_counter(), 500

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if api:
            rt.in_flight += 1
            rt.metrics.in_flight.inc()
        try:
            await app(scope, receive, record_status)
        finally:
            if api:
                rt.in_flight -= 1
                rt.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - start
            rt.metrics.requests.labels(route, str(status)).inc()
            rt.metrics.latency.labels(route).observe(elapsed)
            if route not in ("/health", "/ready", "/metrics"):
                run = scope.get("state", {}).get("run")  # set by the generation routes
                tokens = f" {run.prompt_tokens}+{run.generated} tokens" if run is not None else ""
                access_log.info("%s %s %d%s %.0f ms", scope["method"], route, status, tokens, elapsed * 1000)

    return middleware


def create_app(settings: ServeSettings | None = None, pipe: Pipeline | None = None,
               embedder: SiglipEncoder | None = None) -> FastAPI:
    """The server app for `pipe` (and `embedder`), or for the models the settings name, loaded in the
    background, when pipe is None."""
    settings = settings or ServeSettings()
    rt = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if pipe is not None:
            rt.attach(pipe, embedder)
        else:
            rt.load_in_background()
        yield
        rt.draining = True
        rt.close()

    app = FastAPI(title="medgem", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=NOTICE)
    app.state.runtime = rt
    errors.install(app)
    app.include_router(routes.router)
    page = (_STATIC / "index.html").read_text().replace("<!--NOTICE-->", html.escape(NOTICE))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    app.add_middleware(body_limit, limit=settings.limits.max_body_bytes)
    app.add_middleware(auth, rt=rt)  # outside body_limit: no body is read for a caller without a key
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(boundary, rt=rt)
    app.add_middleware(gate, rt=rt)
    app.add_middleware(notice)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase before its own graceful shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.runtime.settings.drain_seconds
            self.runtime.draining = True
            log.warning("draining: %d request(s) in flight; new API requests get 503", self.runtime.in_flight)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.runtime.in_flight == 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def warn_if_exposed(settings: ServeSettings) -> None:
    if not settings.api_keys and not is_loopback(settings.host):
        message = (f"binding {settings.host} without API keys: anyone who can reach this port can use the "
                   "model; set --api-key or MEDGEM_API_KEYS")
        log.warning(message)
        print(f"medgem: warning: {message}", file=sys.stderr)


def run(settings: ServeSettings) -> None:
    """Load the models in the background and serve until SIGTERM/SIGINT (blocking)."""
    warn_if_exposed(settings)
    # Pillow's own bomb check (DecompressionBombError past twice this) follows this server's limit. Set
    # here, not in create_app: it is process-wide, and tests run servers with other limits side by side.
    Image.MAX_IMAGE_PIXELS = settings.limits.max_image_pixels
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=int(settings.drain_seconds))
    DrainingServer(config, app.state.runtime).run()
