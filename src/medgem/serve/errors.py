"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right 4xx.

Every failure a client can cause ends here: a MedgemError from the layers below (400), a schema
violation (422, naming the field but never quoting its value, which may be prompt text), malformed
JSON (400) and the server's own refusals (`APIError`: 401, 404, 413, 429, 503). Anything else is a
bug: app.boundary logs it by exception type and request id (`log_internal`) and answers a generic 500.
"""

from __future__ import annotations

import logging
import re
import traceback
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from medgem.errors import ContextLengthError, MedgemError
from medgem.notice import NOTICE

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """A refusal with an HTTP status, raised by routes and dependencies."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error; it carries the notice itself because some errors bypass the middleware."""
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers={"X-Medgem-Notice": NOTICE, **(headers or {})})


def snake_case(name: str) -> str:
    """CapabilityError -> capability_error: error codes are snake_case, as OpenAI's and the others here are."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def medgem_error(exc: MedgemError) -> APIError:
    """A layer-below error as its 4xx (messages are written for users and never hold prompt text)."""
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else snake_case(type(exc).__name__)
    status = exc.http_status if exc.http_status < 500 else 503  # the engine stopped: try again later
    return APIError(status, str(exc), code=code)


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none|constrained-\w+)$|\[")  # pydantic's names of union branches


def _field(loc: tuple) -> str:
    """`messages.0.content` from pydantic's location, cut where it names a union branch."""
    parts: list[str] = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, str) and _UNION_MEMBER.search(part):
            break
        parts.append(str(part))
    return ".".join(parts) or "body"


def _validation(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    deepest = max(errors, key=lambda e: len(e.get("loc", ())))
    where = _field(tuple(deepest.get("loc", ())))
    # pydantic's messages name the expected type or range, never the input, except a union's tag.
    said = dict.fromkeys("unknown or missing part 'type' (expected 'text' or 'image_url')"
                         if e["type"].startswith("union_tag") else e.get("msg", "invalid value")
                         for e in errors if _field(tuple(e.get("loc", ()))) == where)
    return APIError(422, f"{where}: {'; or '.join(said)}", param=where, code="invalid_value")


def log_internal(path: str, exc: BaseException, debug: bool) -> str:
    """Log a bug by exception type and a new request id (the message may quote input, so never it);
    the frames only with --debug. Returns the request id the client is told."""
    rid = uuid.uuid4().hex[:12]
    log.error("internal error on %s: %s (request %s)", path, type(exc).__name__, rid)
    if debug:
        log.error("traceback of request %s (message withheld):\n%s", rid,
                  "".join(traceback.format_tb(exc.__traceback__)))
    return rid


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an OpenAI-shaped error."""

    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    async def medgem(_: Request, exc: MedgemError) -> JSONResponse:
        return await api_error(_, medgem_error(exc))

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(_, _validation(exc))

    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=dict(exc.headers or {}))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(MedgemError, medgem)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)
