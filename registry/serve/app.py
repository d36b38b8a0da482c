"""The FastAPI app of the node service: routes, error handlers, metrics, lifespan."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from semla.registry._limits import MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_UPSAMPLE_ELEMENTS
from semla.registry.metrics import install_http_metrics
from semla.registry._node_metrics import NAMESPACE as NODE_METRICS
from semla.registry._node_metrics import BatchMetrics, NodeCollector
from semla.registry.asgi import (
    ERROR_RESPONSES,
    BodyGuard,
    frozen_heap,
    install_error_handlers,
    install_offline_docs,
)
from semla.registry.retrieval import (
    TEMPERATURE_RANGE,
)
from semla.schemas.errors import UnprocessableError
from semla.registry.serve.form import decode_image, parse_params, read_form
from semla.registry.serve.models import SEGMENT_BODY, SegmentResponse, result_json
from semla.registry.serve.settings import MAX_IMAGE_PIXELS, ServeSettings
from semla.registry.serve.worker import Job, Worker

if TYPE_CHECKING:
    from semla.registry.node import Node


# -- app ------------------------------------------------------------------------------------------
def create_app(node: "Node", settings: ServeSettings = ServeSettings()) -> FastAPI:
    """Build the node service around a pulled :class:`~semla.registry.node.Node`.

    The worker thread starts with the app's lifespan and stops with it; from then on the
    node belongs to that thread: do not call it from elsewhere while the app runs.
    """
    worker = Worker(node, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            with frozen_heap():
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
    install_error_handlers(app, service="node")
    if settings.metrics:
        http = install_http_metrics(app, NODE_METRICS)
        worker.on_batch = BatchMetrics(http).observe
        http.registry.register(NodeCollector(worker))

    @app.post(
        "/v1/segment",
        tags=["inference"],
        summary="Segment images with retrieved, fused adapters",
        openapi_extra=SEGMENT_BODY,
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
        form = await read_form(request, settings)
        params = parse_params(form.fields, settings)
        if not form.images:
            raise UnprocessableError("send at least one file part named images", code="no_images")
        arrays = await run_in_threadpool(lambda: [decode_image(name, data) for name, data in form.images])
        key = params.options()
        jobs = [Job(a, params.classes, key, concurrent.futures.Future()) for a in arrays]
        worker.submit(jobs)
        done = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        results = await run_in_threadpool(
            lambda: [result_json(name, d, params.format) for (name, _), d in zip(form.images, done)])
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
