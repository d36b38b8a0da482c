"""Cursor pagination for everything the registry lists (adapters, versions, keys).

A list is read one page at a time in a fixed order, and a page ends with a cursor naming the
last item it held; the next page starts strictly after it (keyset pagination: a page costs the
same at the millionth adapter as at the first, and publishing meanwhile never repeats or skips
an item that was already there). The cursor is opaque to callers: URL-safe base64 of canonical
JSON ``{"k": list kind, "a": last item, "s": digest of the filters}``. Everything in it is
public (a name, a version, a key id), so it needs no signature; it is validated instead: a
cursor that does not decode, was made for another list or other filters, or names an item
outside the list's domain is refused as ``bad_cursor`` (HTTP 400), never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import literal

from semla.schemas import NAME_PATTERN, JsonLimits, canonical_json, strict_json_loads
from semla.schemas.errors import InvalidInputError, SemlaError

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_CURSOR_CHARS", "Page", "adapters_scope", "encode_cursor",
           "decode_cursor", "check_limit", "rows_limit"]

#: Items per page when the caller does not say.
DEFAULT_LIMIT = 100
#: Most items one page may hold (an adapter summary carries its centroids: ~2 KB at 64-d, k=1).
MAX_LIMIT = 1000
#: Longest cursor accepted (a real one is under 200 characters).
MAX_CURSOR_CHARS = 512

T = TypeVar("T")

#: What the last item of each kind of list looks like.
_NAME_RE = re.compile(NAME_PATTERN)
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_CURSOR_LIMITS = JsonLimits(max_bytes=MAX_CURSOR_CHARS, max_depth=2, max_containers=4)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def _is_version(value: object) -> bool:
    return type(value) is int and 1 <= value <= 2**53


def _is_key_id(value: object) -> bool:
    return isinstance(value, str) and _KEY_RE.fullmatch(value) is not None


_KINDS = {"adapters": _is_name, "versions": _is_version, "keys": _is_key_id}


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its items and the cursor of the next page (None: this was the last)."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


def adapters_scope(name: str | None = None, domain: str | None = None, words: list[str] | None = None) -> dict:
    """The filters of the adapter listing a cursor is bound to (``words``: the search, sorted)."""
    return {"name": name, "domain": domain or None, "search": words or None}


def _scope_digest(scope: Mapping[str, object]) -> str:
    return hashlib.sha256(canonical_json(dict(scope))).hexdigest()[:16]


def encode_cursor(kind: str, after: str | int, scope: Mapping[str, object] | None = None) -> str:
    """The cursor of the page after ``after`` in list ``kind`` under the filters ``scope``."""
    if kind not in _KINDS or not _KINDS[kind](after):
        raise InvalidInputError(f"no cursor for {after!r} in the {kind} list")
    doc = {"k": kind, "a": after, "s": _scope_digest(scope or {})}
    return base64.urlsafe_b64encode(canonical_json(doc)).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, kind: str, scope: Mapping[str, object] | None = None) -> str | int:
    """The last item of the previous page, from a cursor a caller sent back.

    Raises:
        InvalidInputError: ``bad_cursor``: not a cursor of this list with these filters.
    """
    bad = f"invalid cursor for the {kind} list: pass back the cursor of the previous page unchanged"
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_CHARS or not cursor.isascii():
        raise InvalidInputError(bad, code="bad_cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = strict_json_loads(raw, what="cursor", limits=_CURSOR_LIMITS)
    except (binascii.Error, ValueError, SemlaError):
        raise InvalidInputError(bad, code="bad_cursor") from None
    if not isinstance(doc, dict) or set(doc) != {"k", "a", "s"} or doc["k"] != kind:
        raise InvalidInputError(bad, code="bad_cursor")
    if doc["s"] != _scope_digest(scope or {}):
        raise InvalidInputError(f"this cursor was made for other filters of the {kind} list: keep the filters "
                                "of the first page", code="bad_cursor")
    if not _KINDS[kind](doc["a"]):
        raise InvalidInputError(bad, code="bad_cursor")
    return doc["a"]


def check_limit(limit: int) -> int:
    """``limit`` when it is a page size the registry serves.

    Raises:
        InvalidInputError: ``bad_limit``: not between 1 and :data:`MAX_LIMIT`.
    """
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"limit must be between 1 and {MAX_LIMIT}, got {limit!r}", code="bad_limit")
    return limit


def rows_limit(limit: int) -> Any:
    """The ``LIMIT`` of a page's query: ``limit`` (checked) + 1 rows, the one more telling whether
    a page follows, written into the SQL as a number rather than bound as a parameter.

    psycopg prepares a statement after its fifth run, and PostgreSQL then plans each run anew as
    long as that custom plan looks cheaper than the generic one. With ``LIMIT $n`` the generic
    plan is costed for a tenth of the table, so it never won: every listing page was planned
    again (measured at 100k: 2,010 custom plans of 2,010 runs, 0.65 ms of backend CPU a page;
    with the number written in, generic plans from the sixth run on and 0.48 ms).
    """
    return literal(check_limit(limit) + 1, literal_execute=True)
