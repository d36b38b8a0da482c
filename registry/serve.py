"""``semla-node serve``: the inference node as an HTTP service with dynamic batching.

Why a worker thread: :class:`~semla.registry.node.Node` is not thread-safe (fusion merges
weights into the base model in place), so every call into it (segment, pull, health) runs on
ONE worker thread. Requests never touch the node: they decode their images, put one job per
image on a queue and await a future. The worker takes the first waiting job, gathers more
for at most ``max_wait_ms`` after that job arrived (or until ``max_batch`` images), groups
them by retrieval settings and calls ``node.segment`` once per group. Images of different
requests (and different vocabularies) thus share one forward pass. Between batches the
worker refreshes the adapter index every ``refresh_seconds`` (a failure is logged, the node
keeps serving its last index) and takes a health snapshot that ``/healthz`` answers from
without waiting for the worker.

Python API::

    node = Node("http://127.0.0.1:8080"); node.pull()
    app = create_app(node, ServeSettings(max_batch=16, max_wait_ms=10))
    uvicorn.run(app, host="127.0.0.1", port=8090)

Every error is ``{"error": {"code": ..., "message": ...}}``, as on the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import copy
import dataclasses
import io
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from semla.registry.cli_common import EXIT_OK, add_node_arguments, add_weighting_arguments, build_node
from semla.registry._limits import MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_UPSAMPLE_ELEMENTS
from semla.registry.logs import LOG_FORMAT_ENV, LOG_FORMATS, resolve_log_format, uvicorn_log_config
from semla.registry.metrics import install_http_metrics
from semla.registry._node_metrics import NAMESPACE as NODE_METRICS
from semla.registry._node_metrics import BatchMetrics, NodeCollector
from semla.registry.asgi import (
    ERROR_RESPONSES,
    BodyGuard,
    BodyLimits,
    BodyTimeout,
    Part,
    RequestTooLarge,
    install_error_handlers,
    install_offline_docs,
    read_multipart,
    status_for,
)
from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DISTANCES,
    DEFAULT_WEIGHTING,
    TEMPERATURE_RANGE,
    temperature_ok,
)
from semla.registry.weighting import MAX_GUARD_Z, WEIGHTINGS, check_guard_z, list_weightings
from semla.schemas.api import MAX_TEMPERATURE, MIN_TEMPERATURE
from semla.schemas.errors import InvalidInputError, RegistryError, SemlaError

if TYPE_CHECKING:
    from semla.registry.node import Node, Prediction

logger = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app", "add_parser", "encode_rle", "decode_rle", "encode_png", "decode_png"]

#: Largest decoded image accepted (pixels); larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TOP_K = 64
FORMATS = ("png", "rle")
#: How often an idle worker refreshes the health snapshot (seconds).
_HEALTH_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How the service batches, what it accepts and how often it refreshes the index.

    Attributes:
        max_batch: most images in one ``node.segment`` call.
        max_wait_ms: longest a queued image waits for others to join its batch.
        max_upload_bytes: largest request body (all parts together).
        max_images: most images in one request.
        max_queue: most images waiting; beyond it requests get 503 ``busy``.
        refresh_seconds: period of the background ``node.pull()``; 0 disables it.
        top_k, temperature, distance, weighting, guard, guard_z: retrieval defaults when a request
            gives none (temperature None: the weighting scheme's own).
        body_limits: how fast a request body must arrive (slower ones get 408 and are cut off).
        metrics: serve Prometheus metrics at ``/metrics`` (and count requests and batches).
    """

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_images: int = 32
    max_queue: int = 1024
    refresh_seconds: float = 60.0
    top_k: int = DEFAULT_TOP_K
    temperature: float | None = DEFAULT_TEMPERATURE
    distance: str = DEFAULT_DISTANCE
    weighting: str = DEFAULT_WEIGHTING
    guard: bool = False
    guard_z: float | None = None
    body_limits: BodyLimits = BodyLimits()
    metrics: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "max_upload_bytes", "max_images", "max_queue"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append("max_wait_ms must be in [0, 10000]")
        if not self.refresh_seconds >= 0:
            problems.append("refresh_seconds must be >= 0 (0 disables refresh)")
        if not 1 <= self.top_k <= MAX_TOP_K:
            problems.append(f"top_k must be in [1, {MAX_TOP_K}]")
        if not temperature_ok(self.temperature):
            problems.append(f"temperature must lie in {TEMPERATURE_RANGE}")
        if self.distance not in DISTANCES:
            problems.append(f"distance must be one of {', '.join(DISTANCES)}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {', '.join(list_weightings())}")
        if self.guard_z is not None and not _guard_z_ok(self.guard_z):
            problems.append(f"guard_z must lie in [0, {MAX_GUARD_Z:g}]")
        if problems:
            raise InvalidInputError("invalid serve settings: " + "; ".join(problems))


class UnprocessableError(InvalidInputError):
    """A well-formed request whose content is refused (answered 422 with its own code)."""

    code = "invalid_request"


class ServiceBusyError(SemlaError):
    """The queue is full or the worker is not running (answered 503)."""

    code = "busy"


# -- mask encodings -------------------------------------------------------------------------------
def encode_png(mask: np.ndarray) -> str:
    """uint8 (H, W) class indices → base64 of a greyscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img, dtype=np.uint8).copy()


def encode_rle(mask: np.ndarray, classes: list[str]) -> dict[str, list[list[int]]]:
    """Runs ``[start, length]`` per class over the row-major flattened mask (every class listed)."""
    flat = np.asarray(mask).ravel()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1]) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    out: dict[str, list[list[int]]] = {name: [] for name in classes}
    for value, start, length in zip(values.tolist(), starts.tolist(), lengths.tolist()):
        out[classes[value]].append([start, length])
    return out


def decode_rle(rle: dict[str, list[list[int]]], classes: list[str], height: int, width: int) -> np.ndarray:
    flat = np.zeros(height * width, dtype=np.uint8)
    for value, name in enumerate(classes):
        for start, length in rle.get(name, []):
            flat[start : start + length] = value
    return flat.reshape(height, width)


# -- the worker -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    image: np.ndarray
    classes: list[str]
    key: tuple  # the retrieval options as sorted (name, value) pairs: one node.segment call per value
    future: concurrent.futures.Future
    enqueued: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True)
class _Done:
    prediction: "Prediction"
    queue_ms: float
    compute_ms: float
    batch_size: int


_STOP = object()
_REFRESH = object()


class _Worker:
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
            if isinstance(job, _Job) and not job.future.cancelled():
                job.future.set_exception(ServiceBusyError("the service is shutting down", code="shutting_down"))

    def submit(self, jobs: list[_Job]) -> None:
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
                first = self.queue.get(timeout=max(0.0, min(next_refresh - now, _HEALTH_INTERVAL)))
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

    def _gather(self, first: _Job) -> tuple[list[_Job], list[object]]:
        """Up to ``max_batch`` jobs, waiting at most ``max_wait_ms`` after ``first`` arrived."""
        batch, controls = [first], []
        deadline = first.enqueued + self.settings.max_wait_ms / 1000.0
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                batch.append(item)
            else:
                controls.append(item)
                if item is _STOP:
                    break
        return batch, controls

    def _run(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for key, jobs in groups.items():
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._segment(jobs, dict(key), isolate=True)

    def _segment(self, jobs: list[_Job], options: dict[str, Any], *, isolate: bool) -> None:
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
            job.future.set_result(_Done(pred, (started - job.enqueued) * 1000.0, compute_ms, len(jobs)))
        if self.on_batch is not None:
            try:
                self.on_batch(compute_ms / 1000.0, [started - j.enqueued for j in jobs])
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                logger.exception("batch metrics failed")

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
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


# -- request parsing ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Form:
    images: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


_FIELDS = ("classes", "top_k", "temperature", "distance", "weighting", "guard", "guard_z", "format")


def _form_part(max_images: int):
    """``accept`` hook: repeatable ``images`` parts up to ``max_images``, each field at most once."""

    def accept(name: str, parts: list[Part]) -> None:
        if name == "images":
            if sum(p.name == "images" for p in parts) >= max_images:
                raise RequestTooLarge(f"more than {max_images} images in one request")
        elif name not in _FIELDS:
            raise UnprocessableError(f"unexpected form part {name!r}; expected images and "
                                     f"{', '.join(_FIELDS)}", code="invalid_form")
        elif any(p.name == name for p in parts):
            raise UnprocessableError(f"form field {name!r} given twice", code="invalid_form")

    return accept


async def _read_form(request: Request, settings: ServeSettings) -> _Form:
    """Stream the multipart body into memory, counting bytes and images against the limits."""
    try:
        parts = await read_multipart(request, max_bytes=settings.max_upload_bytes,
                                     accept=_form_part(settings.max_images))
    except InvalidInputError as exc:
        if isinstance(exc, (RequestTooLarge, UnprocessableError, BodyTimeout)):
            raise
        raise UnprocessableError(exc.message, code=exc.code) from None
    form = _Form()
    for part in parts:
        if part.name == "images":
            form.images.append((part.filename or f"image-{len(form.images)}", part.data))
        else:
            form.fields[part.name] = part.data.decode("utf-8", errors="replace")
    return form


@dataclasses.dataclass(frozen=True)
class _Params:
    classes: list[str]
    top_k: int
    temperature: float | None
    distance: str
    format: str
    weighting: str = DEFAULT_WEIGHTING
    guard: bool = False
    guard_z: float | None = None

    def options(self) -> tuple:
        """The retrieval options as a hashable batching key (sorted (name, value) pairs)."""
        return tuple(sorted({"top_k": self.top_k, "temperature": self.temperature, "distance": self.distance,
                             "weighting": self.weighting, "guard": self.guard, "guard_z": self.guard_z}.items()))


def _guard_z_ok(value: float) -> bool:
    try:
        check_guard_z(value)
    except InvalidInputError:
        return False
    return True


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_params(fields: dict[str, str], settings: ServeSettings) -> _Params:
    classes = [c.strip() for c in fields.get("classes", "").split(",") if c.strip()]
    if not classes:
        raise UnprocessableError("give the class names as a comma-separated form field classes=sky,road,...",
                                 code="empty_classes")
    if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
        raise UnprocessableError(f"classes must be at most {MAX_CLASSES} distinct names", code="bad_classes")
    if max(map(len, classes)) > MAX_CLASS_NAME_CHARS:
        raise UnprocessableError(f"a class name is longer than {MAX_CLASS_NAME_CHARS} characters (CLIP reads 77 "
                                 "tokens)", code="bad_classes")
    try:
        top_k = int(fields.get("top_k") or settings.top_k)
        temperature = float(fields["temperature"]) if fields.get("temperature") else settings.temperature
        guard_z = float(fields["guard_z"]) if fields.get("guard_z") else settings.guard_z
    except ValueError:
        raise UnprocessableError("top_k must be an integer, temperature and guard_z numbers",
                                 code="bad_parameter") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise UnprocessableError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}", code="bad_parameter")
    if not temperature_ok(temperature):
        raise UnprocessableError(f"temperature must lie in {TEMPERATURE_RANGE}, got {temperature}", code="bad_parameter")
    distance = fields.get("distance") or settings.distance
    if distance not in DISTANCES:
        raise UnprocessableError(f"distance must be one of {', '.join(DISTANCES)}", code="bad_parameter")
    fmt = fields.get("format") or "png"
    if fmt not in FORMATS:
        raise UnprocessableError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", code="bad_parameter")
    weighting = fields.get("weighting") or settings.weighting
    if weighting not in WEIGHTINGS:
        raise UnprocessableError(f"unknown weighting {weighting[:64]!r}; valid: {', '.join(list_weightings())}",
                                 code="unknown_weighting")
    guard_text = (fields.get("guard") or "").strip().lower()
    if guard_text and guard_text not in _TRUE + _FALSE:
        raise UnprocessableError("guard must be true or false", code="bad_parameter")
    guard = guard_text in _TRUE if guard_text else settings.guard
    if guard_z is not None and not _guard_z_ok(guard_z):
        raise UnprocessableError(f"guard_z must lie in [0, {MAX_GUARD_Z:g}], got {guard_z}", code="bad_parameter")
    return _Params(classes, top_k, temperature, distance, fmt, weighting, guard, guard_z)


def _decode_image(filename: str, data: bytes) -> np.ndarray:
    """Uploaded bytes → uint8 RGB (H, W, 3), refusing non-images and oversized images."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise RequestTooLarge(f"image {filename!r} is {img.width}x{img.height}; "
                                      f"the limit is {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnprocessableError(f"cannot decode image {filename!r} ({type(exc).__name__}); send PNG or JPEG",
                                 code="bad_image") from None


# -- response schema ------------------------------------------------------------------------------
class ContributionOut(BaseModel):
    name: str
    version: int
    publisher: str
    distance: float
    weight: float


class Timings(BaseModel):
    queue: float
    compute: float
    batch_size: int


class SegmentResult(BaseModel):
    image: str
    classes: list[str]
    width: int
    height: int
    mask_png: str | None = None
    rle: dict[str, list[list[int]]] | None = None
    contributions: list[ContributionOut]
    base_weight: float = 0.0
    timings_ms: Timings


class SegmentResponse(BaseModel):
    results: list[SegmentResult]


def _result(filename: str, done: _Done, fmt: str) -> dict[str, Any]:
    pred = done.prediction
    height, width = pred.mask.shape
    out: dict[str, Any] = {"image": filename, "classes": pred.classes, "width": width, "height": height}
    if fmt == "png":
        out["mask_png"] = encode_png(pred.mask)
    else:
        out["rle"] = encode_rle(pred.mask, pred.classes)
    out["contributions"] = [dataclasses.asdict(c) for c in pred.contributions]
    out["base_weight"] = round(pred.base_weight, 6)
    out["timings_ms"] = {"queue": round(done.queue_ms, 3), "compute": round(done.compute_ms, 3),
                         "batch_size": done.batch_size}
    return out


_SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "one or more images and the vocabulary to segment them with",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images", "classes"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "description": "image files (PNG, JPEG, ...); repeat the part for several"},
                        "classes": {"type": "string", "example": "sky,road,sidewalk,building,vegetation,car",
                                    "description": "comma-separated class names (any vocabulary)"},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                                  "description": "adapters fused per image (capped at the library size)"},
                        "temperature": {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE,
                                        "description": "softmax temperature of the weighting (default: the "
                                                       "scheme's own)"},
                        "distance": {"type": "string", "enum": list(DISTANCES)},
                        "weighting": {"type": "string", "enum": list_weightings(),
                                      "description": "fusion weighting scheme (default calibrated)"},
                        "guard": {"type": "boolean",
                                  "description": "give the base model weight when an image lies outside the "
                                                 "library; base_weight in each result"},
                        "guard_z": {"type": "number", "minimum": 0, "maximum": MAX_GUARD_Z,
                                    "description": "the base's position in spread units (default: the library's)"},
                        "format": {"type": "string", "enum": list(FORMATS), "default": "png",
                                   "description": "png: base64 greyscale PNG of class indices; "
                                                  "rle: {class: [[start, length], ...]} over the row-major mask"},
                    },
                }
            }
        },
    }
}


# -- app ------------------------------------------------------------------------------------------
def _status(exc: SemlaError) -> int:
    if isinstance(exc, UnprocessableError):
        return 422
    if isinstance(exc, ServiceBusyError) or (isinstance(exc, RegistryError) and exc.code == "index_expired"):
        return 503
    return status_for(exc)


def create_app(node: "Node", settings: ServeSettings = ServeSettings()) -> FastAPI:
    """Build the node service around a pulled :class:`~semla.registry.node.Node`.

    The worker thread starts with the app's lifespan and stops with it; from then on the
    node belongs to that thread: do not call it from elsewhere while the app runs.
    """
    worker = _Worker(node, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="SemLA inference node",
        version="1",
        description=(
            "Open-vocabulary segmentation with LoRA adapters retrieved and fused on this node. "
            "For each image the node embeds it with the frozen base, retrieves the nearest adapters "
            "from the registry's signed library (locally), fuses them and segments with the class "
            "names given. Concurrent requests are batched dynamically.\n\n"
            f"Limits: at most {MAX_CLASSES} class names of at most {MAX_CLASS_NAME_CHARS} characters each; "
            f"images up to {MAX_IMAGE_PIXELS} pixels; temperature within {TEMPERATURE_RANGE}. Memory per image "
            f"for the upsampled class logits is bounded: classes are upsampled and arg-maxed in chunks of at most "
            f"{MAX_UPSAMPLE_ELEMENTS} float32 values ({MAX_UPSAMPLE_ELEMENTS * 4 // 2**20} MiB), plus the "
            "mask and a running maximum (5 bytes per pixel), whatever classes x pixels is. Adapters this "
            "node cannot use (they fail verification or the base card's checks) are left out and listed "
            "under `excluded` in /healthz."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyGuard, limits=settings.body_limits)
    install_offline_docs(app)
    app.state.settings = settings
    app.state.worker = worker
    install_error_handlers(app, service="node", status=_status)
    if settings.metrics:
        http = install_http_metrics(app, NODE_METRICS)
        worker.on_batch = BatchMetrics(http).observe
        http.registry.register(NodeCollector(worker))

    @app.post(
        "/v1/segment",
        tags=["inference"],
        summary="Segment images with retrieved, fused adapters",
        openapi_extra=_SEGMENT_BODY,
        response_model=SegmentResponse,
        response_model_exclude_none=True,
        responses={
            408: {**ERROR_RESPONSES, "description": "body_timeout: the request body arrived too slowly"},
            413: {**ERROR_RESPONSES, "description": "too_large: too many images or bytes"},
            422: {**ERROR_RESPONSES, "description": "bad_image, empty_classes, bad_classes, bad_parameter, "
                                                    "no_images, invalid_form"},
            503: {**ERROR_RESPONSES, "description": "busy, index_expired"},
        },
    )
    async def segment(request: Request) -> dict[str, Any]:
        form = await _read_form(request, settings)
        params = _parse_params(form.fields, settings)
        if not form.images:
            raise UnprocessableError("send at least one file part named images", code="no_images")
        arrays = await run_in_threadpool(lambda: [_decode_image(name, data) for name, data in form.images])
        key = params.options()
        jobs = [_Job(a, params.classes, key, concurrent.futures.Future()) for a in arrays]
        worker.submit(jobs)
        done = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        results = await run_in_threadpool(
            lambda: [_result(name, d, params.format) for (name, _), d in zip(form.images, done)])
        return {"results": results}

    @app.get("/healthz", tags=["ops"], summary="Node health and service counters",
             responses={503: {"description": "expired or no index: the node refuses to segment"}})
    def healthz() -> JSONResponse:
        snapshot = copy.deepcopy(worker.health) or {"status": "starting"}
        checked = snapshot.pop("checked_at", None)
        body = {**snapshot, "snapshot_age_s": None if checked is None else round(time.monotonic() - checked, 3),
                **worker.stats()}
        ok = snapshot.get("status") in ("ok", "offline") and body["worker_alive"]
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


# -- command line ---------------------------------------------------------------------------------
_DESCRIPTION = """\
Serve the inference node over HTTP. Each POST /v1/segment carries images and a vocabulary;
requests arriving together are batched (up to --max-batch images, waiting at most
--max-wait-ms), adapters are retrieved, verified and fused on this node, and the index is
refreshed from the registry every --refresh-seconds (the node keeps serving its last index
while the registry is unreachable). OpenAPI docs at /docs, health at /healthz, Prometheus
metrics at /metrics (--log-format json for one JSON object per log line).

Example:
  semla-node serve --registry http://127.0.0.1:8080 --port 8090
  curl -F images=@street.png -F classes=sky,road,car http://127.0.0.1:8090/v1/segment
"""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_upload_bytes=args.max_upload_bytes, max_images=args.max_images,
                             refresh_seconds=args.refresh_seconds, top_k=args.top_k, temperature=args.temperature,
                             weighting=args.weighting, guard=args.guard, guard_z=args.guard_z, metrics=args.metrics)
    log_config = uvicorn_log_config(resolve_log_format(args.log_format))  # a bad value fails before the pull
    node = build_node(args, max_index_age=args.max_index_age)
    app = create_app(node, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True, log_config=log_config)
    return EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to ``semla-node``'s subcommands; the handler is ``args.func``."""
    p = subparsers.add_parser("serve", help="serve segmentation over HTTP with dynamic batching",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ServeSettings()
    add_node_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="TCP port to listen on (default 8090)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help=f"most images per forward pass (default {defaults.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help=f"longest an image waits for batch-mates, in ms (default {defaults.max_wait_ms:g})")
    p.add_argument("--max-images", type=int, default=defaults.max_images,
                   help=f"most images per request (default {defaults.max_images})")
    p.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes,
                   help=f"largest request body (default {defaults.max_upload_bytes})")
    p.add_argument("--refresh-seconds", type=float, default=defaults.refresh_seconds,
                   help=f"re-pull the adapter index this often; 0 disables (default {defaults.refresh_seconds:g})")
    p.add_argument("--max-index-age", type=float, default=86400.0,
                   help="seconds to keep serving the last index while the registry is unreachable (default 86400)")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help=f"default adapters fused per image (default {defaults.top_k})")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="default softmax temperature of the weighting (default: the scheme's own)")
    add_weighting_arguments(p)
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help=f"text: uvicorn's log lines; json: one JSON object per line (env {LOG_FORMAT_ENV}, "
                   "default text)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="do not serve Prometheus metrics at /metrics (nor count requests and batches)")
    p.set_defaults(func=_serve)
    return p
