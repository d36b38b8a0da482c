"""``semla-node serve``: its arguments and the command."""

from __future__ import annotations

import argparse
from typing import Any


from semla.registry.cli_common import EXIT_OK, add_node_arguments, add_weighting_arguments, build_node
from semla.registry.logs import LOG_FORMAT_ENV, LOG_FORMATS, resolve_log_format, uvicorn_log_config
from semla.registry.serve.app import create_app
from semla.registry.serve.settings import ServeSettings


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
