"""The library as the database holds it: which adapter rows are live, the newest live version of
each name, and a row as an :class:`~semla.schemas.AdapterSummary`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from pydantic_core import from_json
from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session, aliased

from semla.schemas import AdapterSummary
from semla.server.db import Adapter, Publisher, iso_utc, utcnow

__all__ = ["compose_summary", "live_adapter", "newest_summaries", "with_summary"]


def live_adapter(table: Any = Adapter) -> Any:
    """Where-clause of an adapter version that may be served: not revoked, its key active
    (``table``: :class:`Adapter` or an alias of it)."""
    return table.revoked_at.is_(None) & table.publisher_key_id.in_(
        select(Publisher.key_id).where(Publisher.active.is_(True))
    )


@functools.cache
def _newest_live(after: bool = False) -> Any:
    """``SELECT adapters`` rows that are the newest live version of their name; with ``after``,
    only names above the bound parameter ``after`` (a listing page's cursor).

    A live row with no newer live row of its name (an anti-join answered from the ``(name,
    version)`` unique index) rather than a ``GROUP BY`` over the whole table: walked in name
    order with a ``LIMIT``, one page reads about as many rows as it returns, whatever the
    library's size. The cursor's range is stated on both sides of the anti-join (implied, but
    it lets PostgreSQL start both index scans at the cursor instead of the first name).
    """
    newer = aliased(Adapter)
    newer_live = [newer.name == Adapter.name, newer.version > Adapter.version, _live_row(newer)]
    stmt = select(Adapter).where(_live_row(Adapter))
    if after:
        newer_live.append(newer.name > bindparam("after"))
        stmt = stmt.where(Adapter.name > bindparam("after"))
    return stmt.where(~select(newer.id).where(*newer_live).exists())


#: An adapter row's fields, less its composed ``summary`` (the listings read that column alone).
ROW_COLUMNS = tuple(column for column in Adapter.__table__.columns if column.name != "summary")


def _plain_rows(session: Session | Connection, stmt: Any, params: Mapping[str, Any] | None = None,
                columns: Sequence[Any] = ROW_COLUMNS) -> list[Any]:
    """The ``adapters`` rows of a ``select(Adapter)`` as plain rows (same attribute names), not
    ORM objects: a third of the time, which counts when the retrieval table reads them all."""
    return list(session.execute(stmt.with_only_columns(*columns), params).all())


def _live_row(table: Any) -> Any:
    """:func:`live_adapter` as a per-row check: not revoked, and the row's key not among the
    inactive ones. Unlike ``IN (active keys)`` it offers the planner no index to start from, so
    it walks the name index in order and stops at the page's end instead of sorting every live
    row. The inactive keys are read once per query into a hashed set (PostgreSQL's hashed
    subplan, SQLite's list subquery), where an ``EXISTS`` on each row's own key looked the key
    up twice per listed row (measured at 100k on PostgreSQL: 1.1 against 0.6 ms of backend CPU a
    listing page). Every row's key is a registered one (a foreign key), so the two agree."""
    inactive = select(Publisher.key_id).where(Publisher.active.is_not(True))
    return table.revoked_at.is_(None) & table.publisher_key_id.not_in(inactive)


def _summary(row: Adapter) -> AdapterSummary:
    return AdapterSummary(
        name=row.name,
        version=row.version,
        publisher=row.publisher_key_id,
        base_fingerprint=row.base_fingerprint,
        domain=row.domain,
        sample_count=row.sample_count,
        manifest_sha256=row.manifest_sha256,
        # Written by the registry itself (canonical JSON of a verified manifest's vectors): parsed
        # by pydantic-core (finite floats only), 6x faster than the hostile-input parser, which
        # cost two thirds of a listing page.
        centroids=from_json(row.centroids, allow_inf_nan=False),
        spread=None if row.spread is None else from_json(row.spread, allow_inf_nan=False),
        created_at=iso_utc(row.created_at),
        revoked=row.revoked_at is not None,
    )


def compose_summary(row: Any) -> str:
    """``_summary(row)``'s JSON text, composed instead of built, for the row's ``summary`` column.

    The centroids and spread go in as the canonical JSON text the registry stored for them (it
    wrote that text from a verified manifest), so nothing is parsed and re-encoded. ``row``: an
    :class:`Adapter` or any object with its attributes (a bulk insert's values, a migration's row).
    """
    text = json.encoder.encode_basestring_ascii  # json.dumps of a str, without its per-call set-up
    spread = "" if row.spread is None else f',"spread":{row.spread}'
    return (f'{{"name":{text(row.name)},"version":{int(row.version)},"publisher":{text(row.publisher_key_id)},'
            f'"base_fingerprint":{text(row.base_fingerprint)},"domain":{text(row.domain)},'
            f'"sample_count":{int(row.sample_count)},"manifest_sha256":{text(row.manifest_sha256)},'
            f'"centroids":{row.centroids},"created_at":"{iso_utc(row.created_at)}",'
            f'"revoked":{"true" if row.revoked_at is not None else "false"}{spread}}}')


def with_summary(values: dict[str, Any]) -> dict[str, Any]:
    """One row's values for a bulk ``insert(Adapter)`` (which skips the ORM), completed: not
    revoked, no spread and created now unless given, and the composed ``summary``."""
    row = {"spread": None, "revoked_at": None, "created_at": utcnow(), **values}
    row["summary"] = compose_summary(SimpleNamespace(**row))
    return row


def newest_summaries(session: Session | Connection, base: str | None = None) -> list[AdapterSummary]:
    """The whole index (newest live version of every name, by name), or one base's part of it."""
    stmt = _newest_live()
    if base is not None:
        stmt = stmt.where(Adapter.base_fingerprint == base)
    return [_summary(row) for row in _plain_rows(session, stmt.order_by(Adapter.name))]
