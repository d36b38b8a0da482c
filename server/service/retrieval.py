"""Server-side SemLA retrieval over one base's newest adapters.

Each base's centroid table is cached with the library version it was read at. A request that
finds the version moved on updates the table instead of reading the library again: it reads the
names changed since (``adapters.changed_in``, stamped in every publishing transaction), reads
those names' newest live rows, and splices them into a copy of the arrays (and of the ANN
index). One request updates at a time; the others wait for it and use its table. A table is
immutable once built, so a search never sees one half updated.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic_core import from_json
from sqlalchemy import Connection, bindparam, select

from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.registry.weighting import base_weight_of, check_weighting
from semla.schemas import RetrievedAdapter, RetrieveRequest, RetrieveResponse
from semla.schemas.errors import InvalidInputError, NotFoundError
from semla.server.db import Adapter, library_version
from semla.server.service.core import ServiceCore
from semla.server.service.library import _newest_live, _plain_rows

logger = logging.getLogger(__name__)

__all__ = ["RetrievalPart", "BaseTable"]

#: The columns retrieval reads of a row.
_COLUMNS = (Adapter.name, Adapter.version, Adapter.publisher_key_id, Adapter.centroids, Adapter.spread)
#: Changed names read per statement (bound parameters stay well under every backend's limit).
_NAMES_PER_QUERY = 1000
#: More changed names than this share of the table (or than the floor): read the table whole.
_UPDATE_SHARE, _UPDATE_FLOOR = 0.25, 1000
#: Tables kept (one per base model), oldest dropped first.
_TABLES_KEPT = 8


@dataclasses.dataclass(frozen=True)
class _Adapters:
    """Who the adapters of a table are, in its order (by name)."""

    names: np.ndarray  # (A,) object: str, ascending
    versions: np.ndarray  # (A,) int64
    publishers: np.ndarray  # (A,) object: str (key ids)

    def __len__(self) -> int:
        return len(self.names)


def _objects(values: Sequence[str]) -> np.ndarray:
    """A 1-d object array of ``values`` (str arrays would pad every name to the longest)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _parse(rows: Sequence[Any], dim: int | None) -> tuple[_Adapters, CentroidTable]:
    """``rows`` (name order) as a table, leaving out (and logging) each adapter whose centroids
    are not finite, non-zero ``dim``-dimensional vectors (``dim`` None: the most common dimension
    among them). Uploads are checked against the base card, so this only drops rows stored
    before that check, or under another card."""
    parsed = [from_json(row.centroids, allow_inf_nan=False) for row in rows]
    if dim is None:
        dims = Counter(len(c) for cents in parsed for c in cents)
        dim = dims.most_common(1)[0][0] if dims else 0
    kept, blocks = [], []
    for row, cents in zip(rows, parsed):
        if dim and cents and all(len(c) == dim for c in cents):
            kept.append(row)
            blocks.append(cents)
        else:
            logger.warning("retrieval leaves out %s v%d: its centroids are not %d-dimensional", row.name, row.version, dim)
    counts = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
    raw = np.asarray(list(itertools.chain.from_iterable(blocks)), dtype=np.float64).reshape(-1, max(dim, 1))  # dim 0: no rows kept
    bad_rows = ~(np.isfinite(raw).all(axis=1) & (np.linalg.norm(raw, axis=1) > 0.5))
    bad = np.repeat(np.arange(len(kept)), counts)[bad_rows]
    if len(bad):
        for i in np.unique(bad).tolist():
            logger.warning("retrieval leaves out %s v%d: its centroids are not unit vectors", kept[i].name, kept[i].version)
        good = np.ones(len(kept), dtype=bool)
        good[bad] = False
        raw = raw[np.repeat(good, counts)]
        kept = [row for row, ok in zip(kept, good.tolist()) if ok]
        counts = counts[good]
    spread = np.full((len(kept), 3), np.nan)
    for i, row in enumerate(kept):
        if row.spread is not None:
            spread[i] = np.asarray(from_json(row.spread, allow_inf_nan=False), dtype=np.float64)[:3]
    adapters = _Adapters(_objects([r.name for r in kept]), np.asarray([r.version for r in kept], dtype=np.int64),
                         _objects([r.publisher_key_id for r in kept]))
    return adapters, CentroidTable.from_rows(raw, counts, spread)


@dataclasses.dataclass(frozen=True)
class BaseTable:
    """One base's retrieval table as of library version ``generation`` (never changed: replaced)."""

    generation: int
    adapters: _Adapters
    table: CentroidTable
    index: Any  # ann.CentroidIndex above ann.ANN_THRESHOLD centroids, else None

    @classmethod
    def of(cls, generation: int, adapters: _Adapters, table: CentroidTable, moved: tuple | None = None) -> "BaseTable":
        """The table of ``adapters``; with ``moved`` (the previous table's index, its kept rows
        and the added ones), that index moved to it instead of a new one trained.

        Raises:
            NotFoundError: no adapter.
        """
        if not len(adapters):
            raise NotFoundError("no adapter for this base model")
        from semla.server import ann  # faiss is imported with it: on the first retrieval only

        index = None
        if ann.choose(table) == "ann":
            previous = moved[0] if moved is not None else None
            index = ann.CentroidIndex.build(table) if previous is None else previous.updated(table, *moved[1:])
        else:
            table.keep_columns()  # every request's product, laid out once here
        return cls(generation, adapters, table, index)

    def updated(self, generation: int, changed: Sequence[str], new: tuple[_Adapters, CentroidTable]) -> "BaseTable":
        """This table with every name in ``changed`` replaced by its adapter in ``new`` (by
        name; a changed name absent from it left the table: revoked, or now of another base)."""
        old, (added, added_table) = self.adapters, new
        changed = _objects(changed)
        keep = np.ones(len(old), dtype=bool)
        found = np.minimum(np.searchsorted(old.names, changed), len(old) - 1)
        keep[found[old.names[found] == changed]] = False
        names = old.names[keep]
        at = np.searchsorted(names, added.names)  # where each new adapter goes among the kept ones
        table, kept_rows, added_rows = self.table.spliced(keep, at, added_table)
        adapters = _Adapters(np.insert(names, at, added.names), np.insert(old.versions[keep], at, added.versions),
                             np.insert(old.publishers[keep], at, added.publishers))
        return BaseTable.of(generation, adapters, table, (self.index, kept_rows, added_rows))


def _newest_rows(conn: Connection, fingerprint: str, names: Sequence[str] | None = None) -> list[Any]:
    """The newest live row of every name of one base (or of ``names`` only), by name as Python
    orders str (the order updates search the table in; a database collation may differ, and then
    the rows come nearly sorted, which Python's sort takes in one pass)."""
    stmt = _newest_live().where(Adapter.base_fingerprint == fingerprint).order_by(Adapter.name)
    if names is None:
        rows = _plain_rows(conn, stmt, columns=_COLUMNS)
    else:
        stmt = stmt.where(Adapter.name.in_(bindparam("names", expanding=True)))
        rows = []
        for i in range(0, len(names), _NAMES_PER_QUERY):
            rows += _plain_rows(conn, stmt, {"names": list(names[i : i + _NAMES_PER_QUERY])}, columns=_COLUMNS)
    return sorted(rows, key=lambda row: row.name)


def _changed_names(conn: Connection, since: int, limit: int) -> list[str] | None:
    """Names whose newest live version changed after library version ``since`` (sorted), or None
    when more than ``limit`` rows were stamped since. Neither sorted nor made distinct in SQL:
    either would let SQLite's planner walk the name index through the whole table instead of
    the ``changed_in`` index through the stamped rows (measured at 100k: 135 ms against <1)."""
    names = conn.execute(select(Adapter.name).where(Adapter.changed_in > since).limit(limit + 1)).scalars().all()
    return None if len(names) > limit else sorted(set(names))


class RetrievalPart(ServiceCore):
    """``POST /v1/retrieve``."""

    def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """Brute-force SemLA retrieval (numpy, the node's math) over the newest adapters of a base.

        Raises:
            NotFoundError: no adapter of this base model.
            InvalidInputError: the embedding's dimension differs from the centroids', or an
                unknown weighting scheme (``unknown_weighting``).
        """
        check_weighting(body.weighting)  # before any table is built: a bad name is the caller's 400
        base = self._base_table(body.base_fingerprint)
        table, adapters, index = base.table, base.adapters, base.index
        dim = table.vectors.shape[1]
        if len(body.embedding) != dim:
            raise InvalidInputError(f"embedding has {len(body.embedding)} dimensions; "
                                    f"the centroids of this base have {dim}")
        query = np.asarray([body.embedding], dtype=np.float64)  # both searches scale and normalise it
        options = {"top_k": body.top_k, "temperature": body.temperature, "distance": body.distance,
                   "weighting": body.weighting, "guard": body.guard, "guard_z": body.guard_z}
        idx, dist, weights = index.search(query, **options) if index is not None else retrieve_numpy(query, table, **options)
        return RetrieveResponse(results=[
            RetrievedAdapter(name=adapters.names[i], version=int(adapters.versions[i]), publisher=adapters.publishers[i],
                             distance=float(d), weight=float(w))
            for i, d, w in zip(idx[0].tolist(), dist[0].tolist(), weights[0].tolist())
        ], base_weight=float(base_weight_of(weights)[0]) if body.guard else 0.0, weighting=body.weighting)

    def _base_table(self, fingerprint: str) -> BaseTable:
        """The centroid table of one base, at least as new as the library version read first
        (re-read at most every ``recheck_s``, and after every change made here, so replicas
        sharing a database agree within that long).

        Raises:
            NotFoundError: no adapter of this base model.
        """
        generation = self._library_version.get()
        cached = self._tables.get(fingerprint)
        if cached is not None and cached.generation >= generation:
            return cached
        with self._tables_lock:  # one update at a time; the requests waiting here find it done
            cached = self._tables.get(fingerprint)
            if cached is not None and cached.generation >= generation:
                return cached
            with self._reads() as conn:
                # The counter first, then the rows (autocommit: each statement sees every commit
                # before it), so the rows are at least as new as the label; a name changed after
                # the counter was read is at worst read again by the next update.
                generation = library_version(conn)
                try:
                    base = self._updated(conn, fingerprint, generation, cached)
                except NotFoundError:
                    raise NotFoundError(f"no adapter for base model {fingerprint[:12]}") from None
            if fingerprint not in self._tables and len(self._tables) >= _TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
            self._tables[fingerprint] = base
            return base

    def _updated(self, conn: Connection, fingerprint: str, generation: int, cached: BaseTable | None) -> BaseTable:
        """``cached`` updated to ``generation`` with the names changed since, or (with no cached
        table, too many changes, or a base card that now sets another dimension) read whole."""
        card = self.base_cards.cards().get(fingerprint)
        dim = card.embedding.dim if card is not None else None  # None: the rows' most common one
        if cached is not None and dim in (None, cached.table.vectors.shape[1]):
            limit = max(_UPDATE_FLOOR, int(_UPDATE_SHARE * len(cached.adapters)))
            changed = _changed_names(conn, cached.generation, limit)
            if changed is not None:
                new = _parse(_newest_rows(conn, fingerprint, changed), cached.table.vectors.shape[1])
                return cached.updated(generation, changed, new)
        return BaseTable.of(generation, *_parse(_newest_rows(conn, fingerprint), dim))
