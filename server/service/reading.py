"""Reading the library: the paged listing, an adapter's versions, and the stored files.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, func, select

from semla.schemas import BUNDLE_FILES, AdapterSummary
from semla.schemas.errors import GoneError, NotFoundError, StorageError
from semla.server.db import Adapter, AdapterFile, Publisher
from semla.server.paging import (
    DEFAULT_LIMIT,
    Page,
    adapters_scope,
    check_limit,
    decode_cursor,
    encode_cursor,
    rows_limit,
)
from semla.server.service.core import ServiceCore
from semla.server.service.library import ROW_COLUMNS, _newest_live, _plain_rows, _summary

__all__ = ["ReadingPart"]


def _page(rows: list, limit: int, as_json: bool, cursor_after: Callable[[Any], str]) -> Page:
    """The first ``limit`` of ``rows`` (one more was read, to tell whether a page follows); with
    ``as_json``, each item is the row's stored summary JSON."""
    items = [row.summary.encode() if as_json else _summary(row) for row in rows[:limit]]
    return Page(items, cursor_after(rows[limit - 1]) if len(rows) > limit else None)


def _sqlite_summary_rows(conn: Connection, page: Any, aggregate: Any, params: Mapping[str, Any] | None) -> list[Any]:
    """``(name, summary)`` rows of the listing page ``page`` on SQLite, read as one row of two
    aggregates (``aggregate``: :func:`_sqlite_aggregate` of ``page``).

    Python's sqlite3 gives up and takes back the GIL for every row it steps; with a few requests
    in flight, 101 handovers per page cost three times the query itself (measured: 1.1 against
    0.36 ms of CPU a page at 8 threads). Aggregated, the page is one step: its names, and its
    summaries joined by newlines (compact JSON holds none: a newline in a string is escaped),
    split here. SQLite feeds the aggregates in the page's order; the names are checked to
    ascend and the summaries to be as many as the names, and if either ever failed, the page is
    read row by row instead.
    """
    names, text = conn.execute(aggregate, params).one()
    if names is None:
        return []
    names, summaries = names.split(" "), text.split("\n")
    if len(summaries) != len(names) or any(a >= b for a, b in itertools.pairwise(names)):
        return list(conn.execute(page, params).all())
    return [SimpleNamespace(name=name, summary=summary) for name, summary in zip(names, summaries)]


def _sqlite_aggregate(page: Any) -> Any:
    """The listing page ``page`` (a select of names and summaries) as one row: its names joined
    by spaces (names hold none) and its summaries by newlines."""
    rows = page.subquery()
    return select(func.group_concat(rows.c.name, " "), func.group_concat(rows.c.summary, "\n"))


@functools.lru_cache(maxsize=64)
def _unfiltered_page(after: bool, limit: int) -> tuple[Any, Any]:
    """The statements of an unfiltered listing page (the one every node and client pages
    through), the page and its SQLite aggregate, built once: a statement reused keeps its
    SQLAlchemy cache key, which costs as much to compute as the page's query takes to run."""
    page = _newest_live(after=after).order_by(Adapter.name).limit(rows_limit(limit))
    page = page.with_only_columns(Adapter.name, Adapter.summary)
    return page, _sqlite_aggregate(page)


class ReadingPart(ServiceCore):
    """Listings and files."""

    # -- queries --------------------------------------------------------------------------------
    def list_adapters(self, *, name: str | None = None, domain: str | None = None, search: str | None = None,
                      cursor: str | None = None, limit: int = DEFAULT_LIMIT,
                      as_json: bool = False) -> Page[AdapterSummary] | Page[bytes]:
        """One page of the newest live version of every adapter name, by name, optionally filtered
        (``as_json``: each item as its JSON bytes, the row's ``summary`` column).

        Revoked versions and the adapters of revoked (inactive) publisher keys are left out, so
        they vanish from every node's retrieval at its next pull. The filters apply to that
        newest version: ``name`` (exact), ``domain`` (substring, any case), ``search`` (every
        whitespace-separated word occurs in the name or the domain, any case).

        Raises:
            InvalidInputError: ``bad_cursor`` (not a cursor of this listing with these filters)
                or ``bad_limit``.
        """
        limit = check_limit(limit)
        words = sorted(set((search or "").lower().split()))
        scope = adapters_scope(name, domain, words)
        after = decode_cursor(cursor, "adapters", scope) if cursor is not None else None
        params = {"after": after} if after is not None else None
        with self._reads() as conn:
            sqlite = as_json and getattr(conn, "dialect", None) is not None and conn.dialect.name == "sqlite"
            if as_json and name is None and not domain and not words:
                page, aggregate = _unfiltered_page(after is not None, limit)
            else:
                page = _newest_live(after=after is not None)
                if name is not None:
                    page = page.where(Adapter.name == name)
                if domain:
                    page = page.where(Adapter.domain.icontains(domain, autoescape=True))
                for word in words:
                    page = page.where(Adapter.name.icontains(word, autoescape=True)
                                      | Adapter.domain.icontains(word, autoescape=True))
                page = page.order_by(Adapter.name).limit(rows_limit(limit)).with_only_columns(
                    *((Adapter.name, Adapter.summary) if as_json else ROW_COLUMNS))
                aggregate = _sqlite_aggregate(page) if sqlite else None
            rows = (_sqlite_summary_rows(conn, page, aggregate, params) if sqlite
                    else list(conn.execute(page, params).all()))
        return _page(rows, limit, as_json, lambda last: encode_cursor("adapters", last.name, scope))


    def adapter_versions(self, name: str, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT,
                         as_json: bool = False) -> Page[AdapterSummary] | Page[bytes]:
        """One page of the stored versions of ``name`` (revoked ones included), newest first
        (``as_json`` as in :meth:`list_adapters`).

        Raises:
            NotFoundError: no adapter has this name.
            InvalidInputError: ``bad_cursor`` or ``bad_limit``.
        """
        limit = check_limit(limit)
        scope = {"name": name}
        before = decode_cursor(cursor, "versions", scope) if cursor is not None else None
        stmt = select(Adapter).where(Adapter.name == name)
        if before is not None:
            stmt = stmt.where(Adapter.version < before)
        with self._reads() as conn:
            rows = _plain_rows(conn, stmt.order_by(Adapter.version.desc()).limit(rows_limit(limit)),
                               columns=(Adapter.version, Adapter.summary) if as_json else ROW_COLUMNS)
            if not rows and (before is None or conn.scalar(select(Adapter.id).where(Adapter.name == name)
                                                               .limit(1)) is None):
                raise NotFoundError(f"no adapter named {name!r}")
        return _page(rows, limit, as_json, lambda last: encode_cursor("versions", last.version, scope))

    def file_path(self, name: str, version: int, filename: str, *, include_revoked: bool = False) -> Path:
        """Path of the stored blob for one bundle file (looked up by sha from the database).

        Revoked versions are not served (``GoneError``) unless ``include_revoked`` (the
        registry's own pages show what was revoked and why).

        Raises:
            NotFoundError: unknown file name, adapter or version.
            GoneError: ``revoked``: the version, or its publisher key, was revoked.
            RuntimeError: the database names a blob the store does not hold (storage damage).
        """
        if filename not in BUNDLE_FILES:
            raise NotFoundError(f"no bundle file {filename!r}; bundle files are {', '.join(BUNDLE_FILES)}")
        with self._reads() as conn:
            found = conn.execute(
                select(AdapterFile.sha256, Adapter.revoked_at, Publisher.active)
                .join(Adapter, AdapterFile.adapter_id == Adapter.id)
                .join(Publisher, Adapter.publisher_key_id == Publisher.key_id)
                .where(Adapter.name == name, Adapter.version == version, AdapterFile.filename == filename)
            ).first()
        if found is None:
            raise NotFoundError(f"no adapter {name!r} version {version}")
        digest, revoked_at, key_active = found
        if revoked_at is not None and not include_revoked:
            raise GoneError(f"{name} version {version} was revoked by its publisher")
        if not key_active and not include_revoked:
            raise GoneError(f"the publisher key of {name} version {version} was revoked")
        if not self._blobs.exists(digest):
            raise StorageError(f"blob {digest} of {name} v{version}/{filename} is missing from the store")
        return self._blobs.path(digest)

    def file_bytes(self, name: str, version: int, filename: str, *, include_revoked: bool = False) -> bytes:
        """Like :meth:`file_path`, returning the bytes."""
        return self.file_path(name, version, filename, include_revoked=include_revoked).read_bytes()
