"""Where the project's error tree becomes HTTP (the only place it does, per errors.py).

Every error response has the same body, ``{"error": {"code": ..., "message": ...}}``
(:class:`~semla.schemas.ErrorResponse`), so a client tells refusals apart by ``code``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from semla.schemas import ErrorBody, ErrorResponse
from semla.schemas.errors import (
    ConflictError,
    FileSetError,
    HashMismatchError,
    IncompatibleAdapterError,
    InvalidInputError,
    ManifestError,
    NotFoundError,
    RegistryError,
    SemlaError,
    SignatureError,
    TensorFormatError,
    UnknownKeyError,
    VerificationError,
)

__all__ = ["RequestTooLarge", "error_response", "install_error_handlers", "ERROR_RESPONSES"]

logger = logging.getLogger("semla.server")


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


async def _semla_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SemlaError)
    status = status_for(exc)
    logger.info("%s %s refused: %s %s (%s)", request.method, request.url.path, status, exc.code, exc.message)
    return error_response(status, exc.code, exc.message)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if isinstance(detail, dict) and {"code", "message"} <= set(detail):
        code, message = str(detail["code"]), str(detail["message"])
    else:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(detail)
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(problems)
    message = "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
    return error_response(422, "invalid_request", message or "invalid request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error (logged on the registry)")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the ``ErrorResponse`` body."""
    app.add_exception_handler(SemlaError, _semla_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
