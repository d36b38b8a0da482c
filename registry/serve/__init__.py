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

Modules: :mod:`.settings`, :mod:`.codecs` (mask encodings), :mod:`.worker` (the batching
thread), :mod:`.form` (request parsing), :mod:`.models` (answer schema), :mod:`.app` and
:mod:`.cli`.
"""

from semla.registry.serve.app import create_app
from semla.registry.serve.cli import add_parser
from semla.registry.serve.codecs import decode_png, decode_rle, encode_png, encode_rle
from semla.registry.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "add_parser", "encode_rle", "decode_rle", "encode_png", "decode_png"]
