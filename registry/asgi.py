"""The HTTP edge shared by the registry server and the node service (torch-free).

Where the project's error tree becomes HTTP: every error response has the same body,
``{"error": {"code": ..., "message": ...}}`` (:class:`~semla.schemas.ErrorResponse`), so a
client tells refusals apart by ``code``. And a streaming multipart/form-data reader:
Starlette's ``request.form()`` spools large parts to temp files and caps non-file parts at
1 MiB; here every part becomes a :class:`Part` in memory, the body is counted as it streams
in (a client that lies about or omits Content-Length is stopped at ``max_bytes`` too), and the
caller's ``accept`` hook refuses an unwanted part before its bytes are buffered.

:class:`BodyGuard` (ASGI middleware) bounds every request body of both services before any
route sees it: a body must keep arriving (no gap over ``idle_timeout_s``, on average at least
``min_rate`` bytes/s after ``grace_s``) or it is answered 408 and its connection closed; a body
that is not multipart is read whole up to ``max_body_bytes`` and, when it is JSON, checked
against :class:`~semla.schemas.JsonLimits` before FastAPI parses it. :func:`install_offline_docs`
serves /docs and /redoc from assets shipped in a pinned package, never from a CDN.
:func:`frozen_heap` keeps the garbage collector off what a service loaded at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from semla.registry.metrics import ERROR_CODE_STATE
from semla.schemas import ErrorBody, ErrorResponse, JsonLimits, check_json_limits
from semla.schemas.errors import (
    BodyTimeout,
    ConflictError,
    FileSetError,
    GoneError,
    HashMismatchError,
    IncompatibleAdapterError,
    InvalidInputError,
    ManifestError,
    NotFoundError,
    PrivacyBudgetError,
    RateLimitedError,
    RegistryError,
    RequestTooLarge,
    SemlaError,
    SignatureError,
    StorageError,
    TensorFormatError,
    TooFewSamplesError,
    UnavailableError,
    UnknownKeyError,
    UnprocessableError,
    VerificationError,
)

__all__ = [
    "ERROR_RESPONSES",
    "HTTP_STATUS",
    "BodyGuard",
    "BodyLimits",
    "BodyTimeout",
    "Part",
    "RequestTooLarge",
    "frozen_heap",
    "install_offline_docs",
    "error_response",
    "install_error_handlers",
    "read_multipart",
    "status_for",
]

logger = logging.getLogger("semla.http")


#: HTTP status per error class, for the registry and the node service alike; the most specific
#: class in an error's MRO wins.
HTTP_STATUS: dict[type[SemlaError], int] = {
    UnprocessableError: 422,
    RequestTooLarge: 413,
    BodyTimeout: 408,
    ManifestError: 422,
    FileSetError: 422,
    HashMismatchError: 422,
    TensorFormatError: 422,
    SignatureError: 403,
    UnknownKeyError: 403,
    VerificationError: 422,
    IncompatibleAdapterError: 422,
    ConflictError: 409,
    GoneError: 410,
    NotFoundError: 404,
    RateLimitedError: 429,
    TooFewSamplesError: 422,
    PrivacyBudgetError: 403,
    InvalidInputError: 400,
    RegistryError: 502,
    UnavailableError: 503,
    StorageError: 500,
    SemlaError: 400,
}

#: Default code for an HTTPException raised without one (routing 404/405 and the like).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}

#: For ``responses=`` in route declarations, so /docs shows the error body.
ERROR_RESPONSES = {"model": ErrorResponse}


def status_for(exc: SemlaError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400  # pragma: no cover - SemlaError itself is in the table


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _noted(request: Request, status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """:func:`error_response`, with the code noted in the request state for the metrics."""
    setattr(request.state, ERROR_CODE_STATE, code)
    return error_response(status, code, message, headers=headers)


#: Methods probed to rebuild ``Allow`` on a 405.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path.

    Starlette's router answers 405 from the first route whose path matches and puts only *that*
    route's methods in ``Allow``; a path served by several routes (``GET`` and ``POST /v1/keys``
    are two routes) then advertises too few. RFC 9110 §15.5.6: ``Allow`` lists them all. Each
    top-level route is asked, through the public ``BaseRoute.matches``, which methods it would
    take at this path (FastAPI nests included routers, so ``route.methods`` is not enough); a
    route that fully matches the refused method does not discriminate methods and is skipped.
    """
    scope = request.scope
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(scope)[0] is Match.FULL:
            continue
        allowed.update(m for m in _METHODS if route.matches({**scope, "method": m})[0] is Match.FULL)
    return sorted(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if isinstance(detail, dict) and {"code", "message"} <= set(detail):
        code, message = str(detail["code"]), str(detail["message"])
    else:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return _noted(request, exc.status_code, code, message, headers=headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(problems)
    message = "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
    return _noted(request, 422, "invalid_request", message or "invalid request")


def install_error_handlers(app: FastAPI, *, service: str) -> None:
    """Register the handlers that give every error the ``ErrorResponse`` body.

    A library error gets its status from :data:`HTTP_STATUS`; a 5xx among them (damaged storage)
    is logged with its traceback, the rest as one line.

    Args:
        service: names the service in the 500 message ("logged on the <service>").
    """

    async def semla_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SemlaError)
        code = status_for(exc)
        if code >= 500 and code != 503:  # the operator's fault: the log has the details, the caller a code
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.code, exc_info=exc)
            return _noted(request, code, exc.code, f"internal server error (logged on the {service})")
        logger.info("%s %s refused: %s %s (%s)", request.method, request.url.path, code, exc.code, exc.message)
        return _noted(request, code, exc.code, exc.message)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"internal server error (logged on the {service})")

    app.add_exception_handler(SemlaError, semla_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, unexpected)


# -- multipart ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    filename: str
    data: bytes


#: Called with a new part's name and the parts read so far; raises to refuse the part.
Accept = Callable[[str, list[Part]], None]


class _Parts:
    """python-multipart callbacks collecting each part's name, filename and bytes."""

    def __init__(self, accept: Accept) -> None:
        self.parts: list[Part] = []
        self.ended = False
        self._accept = accept
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._filename = ""
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._filename, self._data = b"", "", "", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if not name:
            raise InvalidInputError("a multipart part has no name in Content-Disposition", code="invalid_form")
        self._name = name.decode("utf-8", errors="replace")
        self._filename = options.get(b"filename", b"").decode("utf-8", errors="replace")
        self._accept(self._name, self.parts)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        self.parts.append(Part(self._name, self._filename, bytes(self._data)))
        self._data = bytearray()

    def on_end(self) -> None:
        self.ended = True


async def read_multipart(request: Request, *, max_bytes: int, accept: Accept) -> list[Part]:
    """Parse the request body as multipart/form-data into :class:`Part` objects, in order.

    Raises:
        RequestTooLarge: Content-Length, or the bytes actually received, exceed ``max_bytes``.
        InvalidInputError: not multipart/form-data, or a malformed or truncated body.
        SemlaError: whatever ``accept`` raises for an unwanted part.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInputError("Content-Length is not a number", code="invalid_request")
        if int(declared) > max_bytes:
            raise RequestTooLarge(f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidInputError("expected a multipart/form-data body with a boundary", code="invalid_form")
    parts = _Parts(accept)
    parser = MultipartParser(boundary, parts.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise RequestTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInputError(f"malformed multipart body: {exc}", code="invalid_form") from None
    if not parts.ended:
        raise InvalidInputError("multipart body ended before its closing boundary", code="invalid_form")
    return parts.parts


# -- request bodies -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BodyLimits:
    """How :class:`BodyGuard` reads request bodies.

    Attributes:
        max_body_bytes: largest body that is not multipart/form-data (JSON requests); multipart
            bodies are bounded by the route's own limit as they stream.
        json: bounds on a JSON body, checked before it is parsed.
        idle_timeout_s: longest wait for the next chunk of a body.
        min_rate: bytes per second a body must average once ``grace_s`` has passed; a body of
            ``n`` bytes has ``grace_s + n / min_rate`` seconds in all.
        grace_s: time any body has before ``min_rate`` applies.
    """

    max_body_bytes: int = 1024 * 1024
    json: JsonLimits = JsonLimits(max_bytes=1024 * 1024, max_depth=16, max_containers=1_000)
    idle_timeout_s: float = 10.0
    min_rate: float = 16 * 1024
    grace_s: float = 10.0


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TimedReceive:
    """``receive`` with the body deadlines of :class:`BodyLimits`; raises :class:`BodyTimeout`."""

    def __init__(self, receive: Receive, limits: BodyLimits) -> None:
        self._receive = receive
        self._limits = limits
        self._start = time.monotonic()
        self.received = 0
        self.complete = False

    async def __call__(self) -> Message:
        if self.complete:  # the body is in; what follows is the wait for a disconnect
            return await self._receive()
        limits = self._limits
        deadline = self._start + limits.grace_s + self.received / limits.min_rate
        timeout = min(limits.idle_timeout_s, deadline - time.monotonic())
        try:
            if timeout <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(self._receive(), timeout)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"request body too slow: {self.received} bytes in "
                              f"{time.monotonic() - self._start:.1f} s (at least {limits.min_rate:g} bytes/s after "
                              f"{limits.grace_s:g} s, no pause over {limits.idle_timeout_s:g} s)") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return not media or media == b"application/json" or media.endswith(b"+json")


class BodyGuard:
    """ASGI middleware bounding request bodies in time, size and JSON shape (see the module doc).

    Args:
        app: the ASGI app to guard.
        limits: the bounds; a route reads ``request.app.state`` for nothing of this.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limits: BodyLimits = BodyLimits()) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timed = _TimedReceive(receive, self.limits)

        async def send_closing(message: Message) -> None:
            # A response sent before the body is in (a refusal) ends the connection: the rest of
            # the body is never read.
            if message["type"] == "http.response.start" and not timed.complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"")
        if content_type.lower().startswith(b"multipart/"):
            await self.app(scope, timed, send_closing)  # the route streams it against its own limit
            return
        try:
            body = await self._read(timed, headers.get(b"content-length"))
            if body and _is_json(content_type):
                check_json_limits(body, self.limits.json, what="request body")
        except SemlaError as exc:
            logger.info("%s %s refused: %s (%s)", scope.get("method"), scope.get("path"), exc.code, exc.message)
            await error_response(status_for(exc), exc.code, exc.message)(scope, receive, send_closing)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, timed: _TimedReceive, declared: bytes | None) -> bytes:
        limit = self.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        while not timed.complete:
            message = await timed()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if timed.received > limit:
                raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        return b"".join(chunks)


# -- offline API docs ---------------------------------------------------------------------------
#: Where /docs and /redoc load their scripts from (served by the app itself).
DOCS_ASSETS_URL = "/docs-assets"


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """While a service runs, what it loaded at startup (modules, the app, its engines; some
    150,000 objects in the registry) sits in the garbage collector's permanent generation.

    A full collection traverses every tracked object it can reach; over that startup heap it
    paused every thread for 25-180 ms, several times a minute under load, and those pauses were
    among the slowest 1 % of requests (``POST /v1/retrieve`` at 100k adapters, 8 clients: p99
    78 / 57 ms in two runs without this, 47 / 37 ms with it). Freezing is O(1); what was frozen
    is still freed by reference counting, and cycles among it wait until :func:`gc.unfreeze`
    when the service stops.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def install_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and ReDoc at /redoc with scripts from this app, not a CDN.

    The assets (Swagger UI 5 with OpenAPI 3.1 support, ReDoc 2) come from the pinned
    ``fastapi-offline`` package. Build the app with ``docs_url=None, redoc_url=None``.
    """
    static = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(static)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API docs", oauth2_redirect_url=None,
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{app.title} - ReDoc", redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False,
        )
