"""The registry's Prometheus metrics: ``GET /metrics`` (see the README, "Operating it").

Request counts and latency per route come from the shared middleware
(:mod:`semla.registry.metrics`); uploads accepted and refused (by error code) are counted by a
hook on the upload route's answers. What lives in the database (library size, index version,
ε spent per publisher key) is read at scrape time by :class:`LibraryCollector` in two queries,
so replicas sharing one database report the same numbers and nothing is kept up to date on
the write path. Those numbers are reused for :data:`DB_READ_SECONDS` unless this replica
changed something (any request other than GET/HEAD answered 2xx), so scrapes more frequent
than that (several Prometheus servers, a tight interval) do not scan a large table each time. The ε series are bounded: the :data:`MAX_KEY_SERIES` biggest spenders get
their own series, the rest are summed under ``key_id="_other"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from semla.registry.metrics import HttpMetrics, error_code, install_http_metrics
from semla.server.service import live_adapter
from semla.server.db import Adapter, RecentRead, library_version_select

__all__ = ["install_metrics", "LibraryCollector", "MAX_KEY_SERIES", "UPLOAD_ROUTE", "NAMESPACE"]

logger = logging.getLogger(__name__)

NAMESPACE = "semla_registry"
UPLOAD_ROUTE = "/v1/adapters"
#: Publisher keys with their own ``epsilon_spent`` series; the rest are summed under ``_other``.
MAX_KEY_SERIES = 50
OTHER_KEYS = "_other"
#: Seconds the database part of a scrape is reused (another replica's change shows within this).
DB_READ_SECONDS = 5.0


def _gauge(name: str, text: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=labels)


class LibraryCollector(Collector):
    """Scrape-time gauges: library, index version, ε per key (two queries), connection pool."""

    def __init__(self, engine: Engine, epsilon_budget: float | None) -> None:
        self.engine = engine
        self.epsilon_budget = epsilon_budget
        #: Reused for DB_READ_SECONDS (read at each scrape) unless this replica changed something.
        self._db = RecentRead(self._read_database, lambda: DB_READ_SECONDS)

    def invalidate(self) -> None:
        """The database changed: the next scrape reads it again."""
        self._db.invalidate()

    def _query(self) -> tuple[tuple, list]:
        return self._db.get()

    def _read_database(self) -> tuple[tuple, list]:
        with self.engine.connect() as conn:
            counts = tuple(conn.execute(select(
                select(func.count(distinct(Adapter.name))).where(live_adapter()).scalar_subquery(),
                select(func.count()).select_from(Adapter).scalar_subquery(),
                library_version_select().scalar_subquery(),
                select(func.coalesce(func.sum(Adapter.privacy_epsilon), 0.0)).scalar_subquery(),
            )).one())
            spent = func.sum(Adapter.privacy_epsilon)
            top = [tuple(row) for row in conn.execute(
                select(Adapter.publisher_key_id, spent).where(Adapter.privacy_epsilon.is_not(None))
                .group_by(Adapter.publisher_key_id).order_by(spent.desc(), Adapter.publisher_key_id)
                .limit(MAX_KEY_SERIES))]
        return counts, top

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {
            "up": _gauge("db_up", "1 when the last scrape could read the database"),
            "adapters": _gauge("library_adapters", "adapter names in the index (newest live version of each)"),
            "versions": _gauge("adapter_versions", "adapter versions stored, revoked ones included"),
            "index": _gauge("index_version", "version of the library (the counter that rises with every change)"),
            "epsilon": _gauge("epsilon_spent", f"DP epsilon spent on centroids per signing key (the "
                              f"{MAX_KEY_SERIES} biggest; the rest summed as key_id={OTHER_KEYS})", ["key_id"]),
            "budget": _gauge("epsilon_budget", "DP epsilon each publisher may spend (absent: no limit)"),
            "pool_size": _gauge("db_pool_size", "database connection pool size (pools that have one)"),
            "pool_out": _gauge("db_pool_checked_out", "database connections in use"),
            "pool_overflow": _gauge("db_pool_overflow", "connections open beyond the pool size"),
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()  # names only: registering must not query the database

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        try:
            (adapters, versions, index, total), top = self._query()
        except SQLAlchemyError as exc:
            logger.warning("metrics: cannot read the database: %s", str(exc).splitlines()[0])
            f["up"].add_metric([], 0)
            yield f["up"]
        else:
            f["up"].add_metric([], 1)
            f["adapters"].add_metric([], adapters)
            f["versions"].add_metric([], versions)
            f["index"].add_metric([], index)
            for key_id, eps in top:
                f["epsilon"].add_metric([key_id], float(eps))
            rest = float(total) - sum(float(eps) for _, eps in top)
            if len(top) == MAX_KEY_SERIES and rest > 1e-12:
                f["epsilon"].add_metric([OTHER_KEYS], rest)
            yield from (f[k] for k in ("up", "adapters", "versions", "index", "epsilon"))
        if self.epsilon_budget is not None:
            f["budget"].add_metric([], self.epsilon_budget)
            yield f["budget"]
        yield from self._pool(f)

    def _pool(self, f: dict[str, GaugeMetricFamily]) -> Iterator[Metric]:
        pool = self.engine.pool
        for key, method in (("pool_size", "size"), ("pool_out", "checkedout"), ("pool_overflow", "overflow")):
            read = getattr(pool, method, None)
            if callable(read):  # QueuePool's overflow() is negative until the pool is full
                f[key].add_metric([], max(0, read()))
                yield f[key]


def install_metrics(app: FastAPI, engine: Engine, epsilon_budget: float | None) -> HttpMetrics:
    """Request metrics, upload counters, the library collector and ``GET /metrics`` on ``app``."""
    metrics = install_http_metrics(app, NAMESPACE)
    accepted = Counter("uploads_accepted", "adapter uploads accepted (POST /v1/adapters answered 2xx)",
                       namespace=NAMESPACE, registry=metrics.registry)
    refused = Counter("uploads_refused", "adapter uploads refused, by error code", ["code"],
                      namespace=NAMESPACE, registry=metrics.registry)

    library = LibraryCollector(engine, epsilon_budget)

    def count_upload(scope: dict[str, Any], route: str, method: str, status: int) -> None:
        if method not in ("GET", "HEAD") and status < 400:
            library.invalidate()
        if route == UPLOAD_ROUTE and method == "POST":
            if status < 400:
                accepted.inc()
            else:
                refused.labels(error_code(scope, status)).inc()

    metrics.hooks.append(count_upload)
    metrics.registry.register(library)
    return metrics
