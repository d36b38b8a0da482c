"""The node service's Prometheus metrics: ``GET /metrics`` of ``semla-node serve``.

Three sources, each read where it is cheapest:

* per request: the shared HTTP middleware (:mod:`semla.registry.metrics`);
* per batch, observed by the worker thread: batch size, the time each image waited in the
  queue, the compute time of the batch (histograms: a locked add each);
* at scrape time, by :class:`NodeCollector`: counters and gauges the worker and the node
  already keep (images and batches served, queue depth, fusion paths taken, cache hits,
  misses, evictions and bytes per tier, index age and version, offline state, refreshes).
  The scrape runs on a request thread while the worker runs the node; it only reads numbers
  and dictionaries whose keys are fixed from the start, never calls into the node.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from semla.registry.metrics import LATENCY_BUCKETS, HttpMetrics

__all__ = ["NAMESPACE", "BatchMetrics", "NodeCollector"]

NAMESPACE = "semla_node"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: tier → (hits key, misses key, evictions key) in ``AdapterCache.stats``; a disk miss is a download.
_TIERS = {
    "device": ("device_hits", "device_misses", "device_evictions"),
    "host": ("host_hits", "host_misses", "host_evictions"),
    "disk": ("disk_hits", "downloads", "disk_evictions"),
}


class BatchMetrics:
    """What the worker observes once per batch."""

    def __init__(self, http: HttpMetrics) -> None:
        registry = http.registry
        self.size = Histogram("batch_size", "images per node.segment call", namespace=NAMESPACE,
                              buckets=BATCH_BUCKETS, registry=registry)
        self.queue_wait = Histogram("queue_wait_seconds", "time an image waited in the queue before its "
                                    "batch started", namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=registry)
        self.compute = Histogram("batch_compute_seconds", "time of one batch (retrieve, fuse, segment)",
                                 namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, compute_s: float, waits_s: Sequence[float]) -> None:
        self.size.observe(len(waits_s))
        self.compute.observe(compute_s)
        for wait in waits_s:
            self.queue_wait.observe(wait)


def _counter(name: str, text: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NAMESPACE}_{name}", text, labels=labels)


def _gauge(name: str, text: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=labels)


class NodeCollector(Collector):
    """Scrape-time view of the worker (``Worker`` of :mod:`semla.registry.serve.worker`) and its node."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def _families(self) -> dict[str, Metric]:
        return {
            "images": _counter("images", "images segmented"),
            "batches": _counter("batches", "node.segment calls that succeeded"),
            "failed": _counter("failed_batches", "node.segment calls that failed"),
            "queue": _gauge("queue_depth", "images waiting for the worker"),
            "alive": _gauge("worker_alive", "1 while the inference worker thread runs"),
            "paths": _counter("fusion_batches", "batches fused per path: merged (one weight vector), or a "
                              "per-image mixture laid out as concat or gather", ["path"]),
            "hits": _counter("cache_hits", "adapter cache hits per tier", ["tier"]),
            "misses": _counter("cache_misses", "adapter cache misses per tier (a disk miss is a download)",
                               ["tier"]),
            "evictions": _counter("cache_evictions", "adapters evicted per tier (LRU, over budget)", ["tier"]),
            "rejected": _counter("cache_disk_rejected", "disk entries that failed re-verification"),
            "bytes": _gauge("cache_bytes", "bytes held per tier", ["tier"]),
            "budget": _gauge("cache_budget_bytes", "byte budget per tier", ["tier"]),
            "entries": _gauge("cache_entries", "adapters held per in-memory tier", ["tier"]),
            "age": _gauge("index_age_seconds", "age of the index the node serves (since it was accepted)"),
            "version": _gauge("index_version", "version of the signed index the node serves"),
            "adapters": _gauge("library_adapters", "adapters of this base in the served index"),
            "offline": _gauge("offline", "1 when the registry was unreachable at the last pull (serving "
                              "the cached index)"),
            "refreshes": _counter("index_refreshes", "background index refreshes attempted"),
            "refresh_failures": _counter("index_refresh_failures", "background index refreshes that failed"),
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        worker = self.worker
        f["images"].add_metric([], worker.images)
        f["batches"].add_metric([], worker.batches)
        f["failed"].add_metric([], worker.failed_batches)
        f["queue"].add_metric([], worker.queue.qsize())
        f["alive"].add_metric([], int(worker.thread is not None and worker.thread.is_alive()))
        f["refreshes"].add_metric([], worker.refresh["count"])
        f["refresh_failures"].add_metric([], worker.refresh["failures"])
        node = worker.node
        engine = getattr(node, "engine", None)
        for path, count in dict(getattr(engine, "paths", {})).items():
            f["paths"].add_metric([path], count)
        cache = getattr(node, "cache", None)
        if cache is not None:
            self._cache(f, cache)
        index_time = getattr(node, "index_time", None)
        if index_time is not None:
            f["age"].add_metric([], max(0.0, time.time() - index_time))
        if getattr(node, "index_version", None) is not None:
            f["version"].add_metric([], node.index_version)
        f["adapters"].add_metric([], len(getattr(node, "library", ())))
        f["offline"].add_metric([], int(bool(getattr(node, "offline", False))))
        yield from f.values()

    @staticmethod
    def _cache(f: dict[str, Metric], cache: Any) -> None:
        stats = dict(cache.stats)
        tiers = {"host": cache.host}
        if cache.gpu is not None:  # on a CPU node the device tier is host memory: no series of its own
            tiers["device"] = cache.gpu
        for tier, (hit, miss, evicted) in _TIERS.items():
            if tier == "device" and cache.gpu is None:
                continue
            f["hits"].add_metric([tier], stats.get(hit, 0))
            f["misses"].add_metric([tier], stats.get(miss, 0))
            f["evictions"].add_metric([tier], stats.get(evicted, 0))
        for tier, held in tiers.items():
            f["bytes"].add_metric([tier], held.used)
            f["budget"].add_metric([tier], held.budget)
            f["entries"].add_metric([tier], len(held.entries))
        f["bytes"].add_metric(["disk"], cache.disk_bytes)
        f["budget"].add_metric(["disk"], cache.limits.disk_bytes)
        f["rejected"].add_metric([], stats.get("disk_rejected", 0))
