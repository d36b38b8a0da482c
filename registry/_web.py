"""The HTTP edge shared by the registry server and the node service (torch-free).

Where the project's error tree becomes HTTP: every error response has the same body,
``{"error": {"code": ..., "message": ...}}`` (:class:`~semla.schemas.ErrorResponse`), so a
client tells refusals apart by ``code``. And a streaming multipart/form-data reader:
Starlette's ``request.form()`` spools large parts to temp files and caps non-file parts at
1 MiB; here every part becomes a :class:`Part` in memory, the body is counted as it streams
in (a client that lies about or omits Content-Length is stopped at ``max_bytes`` too), and the
caller's ``accept`` hook refuses an unwanted part before its bytes are buffered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from semla.registry._metrics import ERROR_CODE_STATE
from semla.schemas import ErrorBody, ErrorResponse
from semla.schemas.errors import (
    ConflictError,
    FileSetError,
    HashMismatchError,
    IncompatibleAdapterError,
    InvalidInputError,
    ManifestError,
    NotFoundError,
    PrivacyBudgetError,
    RateLimitedError,
    RegistryError,
    SemlaError,
    SignatureError,
    TensorFormatError,
    TooFewSamplesError,
    UnknownKeyError,
    VerificationError,
)

__all__ = [
    "ERROR_RESPONSES",
    "Part",
    "RequestTooLarge",
    "error_response",
    "install_error_handlers",
    "read_multipart",
    "status_for",
]

logger = logging.getLogger("semla.http")


class RequestTooLarge(InvalidInputError):
    """The request body is larger than ``max_upload_bytes`` (declared or actually sent)."""

    code = "too_large"


#: HTTP status per error class; the most specific class in an error's MRO wins.
_STATUS: dict[type[SemlaError], int] = {
    RequestTooLarge: 413,
    ManifestError: 422,
    FileSetError: 422,
    HashMismatchError: 422,
    TensorFormatError: 422,
    SignatureError: 403,
    UnknownKeyError: 403,
    VerificationError: 422,
    IncompatibleAdapterError: 422,
    ConflictError: 409,
    NotFoundError: 404,
    RateLimitedError: 429,
    TooFewSamplesError: 422,
    PrivacyBudgetError: 403,
    InvalidInputError: 400,
    RegistryError: 502,
    SemlaError: 400,
}

#: Default code for an HTTPException raised without one (routing 404/405 and the like).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}

#: For ``responses=`` in route declarations, so /docs shows the error body.
ERROR_RESPONSES = {"model": ErrorResponse}


def status_for(exc: SemlaError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
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


def install_error_handlers(
    app: FastAPI, *, service: str, status: Callable[[SemlaError], int] = status_for
) -> None:
    """Register the handlers that give every error the ``ErrorResponse`` body.

    Args:
        service: names the service in the 500 message ("logged on the <service>").
        status: HTTP status of a library error (default :func:`status_for`).
    """

    async def semla_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SemlaError)
        code = status(exc)
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
