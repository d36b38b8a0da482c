"""The one thread that owns the node: batches queued images, refreshes the index, snapshots health."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from semla.schemas.errors import InvalidInputError, ServiceBusyError
from semla.registry.serve.settings import HEALTH_INTERVAL, ServeSettings

if TYPE_CHECKING:
    from semla.registry.node import Node, Prediction

logger = logging.getLogger(__name__)


# -- the worker -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    image: np.ndarray
    classes: list[str]
    key: tuple  # the retrieval options as sorted (name, value) pairs: one node.segment call per value
    future: concurrent.futures.Future
    enqueued: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True)
class Done:
    prediction: "Prediction"
    queue_ms: float
    compute_ms: float
    batch_size: int


_STOP = object()
_REFRESH = object()


class Worker:
    """The one thread that calls the node: batches, background refresh, health snapshots."""

    def __init__(self, node: "Node", settings: ServeSettings) -> None:
        self.node = node
        self.settings = settings
        #: Called after each batch with (compute seconds, each image's queue wait in seconds).
        self.on_batch: Callable[[float, list[float]], None] | None = None
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.health: dict[str, Any] | None = None
        self.batches = 0
        self.images = 0
        self.failed_batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.refresh: dict[str, Any] = {"enabled": settings.refresh_seconds > 0, "count": 0, "failures": 0,
                                        "last_ok_unix": None, "last_error": None}

    # lifecycle (event loop side)
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="semla-node-worker", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread is None:
            return
        self.queue.put(_STOP)
        self.thread.join(timeout)
        self.thread = None
        while True:  # nothing is left hanging
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job) and not job.future.cancelled():
                job.future.set_exception(ServiceBusyError("the service is shutting down", code="shutting_down"))

    def submit(self, jobs: list[Job]) -> None:
        if self.thread is None or not self.thread.is_alive():
            raise ServiceBusyError("the inference worker is not running", code="not_running")
        if self.queue.qsize() + len(jobs) > self.settings.max_queue:
            raise ServiceBusyError(f"{self.queue.qsize()} images are queued (limit {self.settings.max_queue}); "
                                   "retry later")
        for job in jobs:
            self.queue.put(job)

    def request_refresh(self) -> None:
        self.queue.put(_REFRESH)

    # the worker thread
    def _loop(self) -> None:
        period = self.settings.refresh_seconds
        next_refresh = time.monotonic() + period if period > 0 else math.inf
        self._snapshot()
        stopping = False
        while not stopping:
            now = time.monotonic()
            if now >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + period
            try:
                first = self.queue.get(timeout=max(0.0, min(next_refresh - now, HEALTH_INTERVAL)))
            except queue.Empty:
                self._snapshot()
                continue
            if first is _STOP:
                break
            if first is _REFRESH:
                self._refresh()
                continue
            batch, controls = self._gather(first)
            self._run(batch)
            for control in controls:
                if control is _STOP:
                    stopping = True
                elif control is _REFRESH:
                    self._refresh()
            self._snapshot()

    def _gather(self, first: Job) -> tuple[list[Job], list[object]]:
        """Up to ``max_batch`` jobs, waiting at most ``max_wait_ms`` after ``first`` arrived."""
        batch, controls = [first], []
        deadline = first.enqueued + self.settings.max_wait_ms / 1000.0
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                batch.append(item)
            else:
                controls.append(item)
                if item is _STOP:
                    break
        return batch, controls

    def _run(self, batch: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for key, jobs in groups.items():
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._segment(jobs, dict(key), isolate=True)

    def _segment(self, jobs: list[Job], options: dict[str, Any], *, isolate: bool) -> None:
        started = time.monotonic()
        try:
            preds = self.node.segment([j.image for j in jobs], [j.classes for j in jobs], batch_size=len(jobs),
                                      **options)
        except InvalidInputError as exc:
            if isolate and len(jobs) > 1:  # one image's problem must not fail its batch-mates
                for job in jobs:
                    self._segment([job], options, isolate=False)
                return
            self._fail(jobs, exc)
            return
        except Exception as exc:  # noqa: BLE001 - handed to the requests; the route maps it (500 logged)
            self._fail(jobs, exc)
            return
        compute_ms = (time.monotonic() - started) * 1000.0
        self.batches += 1
        self.images += len(jobs)
        self.batch_sizes[len(jobs)] += 1
        for job, pred in zip(jobs, preds):
            job.future.set_result(Done(pred, (started - job.enqueued) * 1000.0, compute_ms, len(jobs)))
        if self.on_batch is not None:
            try:
                self.on_batch(compute_ms / 1000.0, [started - j.enqueued for j in jobs])
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                logger.exception("batch metrics failed")

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        self.failed_batches += 1
        for job in jobs:
            job.future.set_exception(exc)

    def _refresh(self) -> None:
        self.refresh["count"] += 1
        try:
            self.node.pull()
        except Exception as exc:  # noqa: BLE001 - a failed refresh never stops the service
            self.refresh["failures"] += 1
            self.refresh["last_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("index refresh failed (still serving the last index): %s", exc)
        else:
            self.refresh["last_ok_unix"] = time.time()
            self.refresh["last_error"] = None
            if self.node.offline:
                logger.warning("index refresh: registry unreachable, serving the cached index")
        self._snapshot()

    def _snapshot(self) -> None:
        try:
            health = self.node.health()
        except Exception as exc:  # noqa: BLE001
            logger.warning("node health failed: %s", exc)
            health = {"status": "error", "message": str(exc)}
        self.health = {**health, "checked_at": time.monotonic()}

    def stats(self) -> dict[str, Any]:
        return {"queue": self.queue.qsize(), "batches_served": self.batches, "images_served": self.images,
                "failed_batches": self.failed_batches,
                "batch_sizes": {str(k): v for k, v in sorted(dict(self.batch_sizes).items())},
                "refresh": dict(self.refresh),
                "worker_alive": self.thread is not None and self.thread.is_alive()}
