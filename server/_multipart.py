"""Read a multipart/form-data upload into memory, generically, with a hard size limit.

Starlette's ``request.form()`` spools large parts to temp files and caps non-file parts at
1 MiB; a bundle upload wants neither. Here every part, file or not, becomes ``name → bytes``
so that ``check_bundle`` alone decides which names are missing or extra, and the body is
counted as it streams in, so a client that lies about (or omits) Content-Length is stopped
at ``max_bytes`` too. Nothing is written to disk.
"""

from __future__ import annotations

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from semla.schemas.errors import FileSetError, InvalidInputError
from semla.server._errors import RequestTooLarge

__all__ = ["read_multipart"]

#: More parts than this is not a bundle (it has four files); refuse before buffering them.
MAX_PARTS = 16


class _Parts:
    """python-multipart callbacks collecting each part's name and bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ended = False
        self._count = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
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
        self._count += 1
        if self._count > MAX_PARTS:
            raise FileSetError(f"upload has more than {MAX_PARTS} parts", code="extra_file")
        self._disposition = b""
        self._name = ""
        self._data = bytearray()

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

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._name in self.files:
            raise FileSetError(f"bundle file {self._name} was sent more than once", code="extra_file")
        self.files[self._name] = bytes(self._data)
        self._data = bytearray()

    def on_end(self) -> None:
        self.ended = True


async def read_multipart(request: Request, *, max_bytes: int) -> dict[str, bytes]:
    """Parse the request body as multipart/form-data into ``part name → bytes``.

    Raises:
        RequestTooLarge: Content-Length, or the bytes actually received, exceed ``max_bytes``.
        InvalidInputError: not multipart/form-data, or a malformed or truncated body.
        FileSetError: a part sent twice, or far too many parts.
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
    parts = _Parts()
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
    return parts.files
