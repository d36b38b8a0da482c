"""Prometheus metrics shared by the registry and the node service (torch-free).

Each app gets its own :class:`prometheus_client.CollectorRegistry`, made in its factory (never
at import), so a process may hold several apps (tests do) without their series mixing.
:func:`install_http_metrics` adds a plain ASGI middleware that counts every request and times
it, labelled by the matched route's *template* (``/v1/adapters/{name}``, never the raw path, so
the label set is bounded by the routes the app declares; a path no route matches is
``<unmatched>``), the method and the status; and a ``GET /metrics`` route in the Prometheus
text format. Gauges that are cheap to read are computed at scrape time by a collector, so the
request path pays for two dictionary lookups and two locked increments, nothing more.

The error code of a refused request (``{"error": {"code": ...}}``) is noted in the request
state by the error handlers of :mod:`semla.registry.asgi`; :func:`error_code` reads it, so a
hook can count refusals by code without parsing response bodies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["UNMATCHED", "HttpMetrics", "install_http_metrics", "error_code", "ERROR_CODE_STATE"]

UNMATCHED = "<unmatched>"
#: Key in the ASGI scope's ``state`` under which the error handlers note a refusal's code.
ERROR_CODE_STATE = "semla_error_code"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Request latency buckets (seconds): from a cached GET to a large upload or a CPU segmentation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Called after each request with (scope, route template, method, status).
Hook = Callable[[dict[str, Any], str, str, int], None]


def error_code(scope: dict[str, Any], status: int) -> str:
    """The error code a refused request was answered with (``internal`` for an unhandled 5xx)."""
    state = scope.get("state")
    code = state.get(ERROR_CODE_STATE) if isinstance(state, dict) else None
    if code:
        return str(code)
    return "internal" if status >= 500 else f"http_{status}"


class HttpMetrics:
    """Request counter and latency histogram of one app, per route template, method and status."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.requests = Counter("http_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], namespace=namespace, registry=registry)
        self.latency = Histogram("http_request_duration_seconds", "HTTP request latency (first byte in to "
                                 "last byte out), by route template and method", ["route", "method"],
                                 namespace=namespace, buckets=LATENCY_BUCKETS, registry=registry)
        self.hooks: list[Hook] = []
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or UNMATCHED
        method = scope.get("method", "")
        method = method if method in _METHODS else "other"
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # .labels() takes a lock and builds a tuple: once per label set
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        for hook in self.hooks:
            hook(scope, route, method, status)


class _Middleware:
    """Pure ASGI (no BaseHTTPMiddleware task per request): time the call, note the status."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with request.state, where the error handlers note codes
        started = time.perf_counter()
        status = 500  # an exception that escapes is answered 500 by the outermost middleware

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - started)


def install_http_metrics(app: FastAPI, namespace: str) -> HttpMetrics:
    """Add request metrics and ``GET /metrics`` to ``app``; returns them (add collectors or hooks
    to ``.registry`` / ``.hooks``). Call in the app factory, before the app serves."""
    metrics = HttpMetrics(CollectorRegistry(auto_describe=True), namespace)
    app.add_middleware(_Middleware, metrics=metrics)

    def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False,
                      summary="Prometheus metrics (text format)")
    app.state.metrics = metrics
    return metrics
