"""``semla-server``: run the registry with uvicorn.

Every flag defaults to its ``SEMLA_*`` environment variable (via :class:`ServerSettings`); a
flag given on the command line wins. Bad settings end with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from semla.server.settings import DEFAULT_MAX_UPLOAD_BYTES, ServerSettings

__all__ = ["main", "build_parser"]

#: flag dest → (ServerSettings field, help text)
_FLAGS = {
    "data_dir": ("--data-dir", "PATH", "directory for the blob store and the default SQLite database "
                 "(env SEMLA_DATA_DIR, default ./semla-data)"),
    "host": ("--host", "HOST", "interface to listen on (env SEMLA_HOST, default 127.0.0.1)"),
    "port": ("--port", "PORT", "TCP port to listen on (env SEMLA_PORT, default 8080)"),
    "admin_token": ("--admin-token", "TOKEN", "bearer token for admin endpoints such as key registration "
                    "(env SEMLA_ADMIN_TOKEN; unset disables them). Prefer the env var: flags show up in ps"),
    "database_url": ("--database-url", "URL", "SQLAlchemy database URL, e.g. postgresql+psycopg://user@host/db "
                     "(env SEMLA_DATABASE_URL, default sqlite:///DATA_DIR/registry.db)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semla-server",
        description="Run the SemLA adapter registry: verifies signed LoRA adapter bundles on upload "
        "and serves the index and files over HTTP (OpenAPI docs at /docs).",
        epilog=f"Also read from the environment: SEMLA_MAX_UPLOAD_BYTES (default {DEFAULT_MAX_UPLOAD_BYTES}). "
        "Access log on stdout, server log on stderr.",
    )
    for dest, (flag, metavar, text) in _FLAGS.items():
        parser.add_argument(flag, dest=dest, metavar=metavar, default=None, help=text)
    return parser


def _fail(message: str) -> int:
    print(f"semla-server: error: {message}", file=sys.stderr)
    return 2


def _settings_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
    env = f"SEMLA_{field.upper()}"
    where = f"{_FLAGS[field][0]} / {env}" if field in _FLAGS else env
    return f"invalid {where}: {first.get('msg', 'invalid value')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``semla-server``; returns the exit status."""
    args = build_parser().parse_args(argv)
    overrides = {dest: value for dest, value in vars(args).items() if value is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        return _fail(_settings_error(exc))
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create data directory {settings.data_dir}: {exc.strerror}")

    import uvicorn

    from semla.server.app import create_app

    try:
        app = create_app(settings)
    except (SQLAlchemyError, ImportError) as exc:
        return _fail(f"cannot open the database: {str(exc).splitlines()[0]}")
    except OSError as exc:
        return _fail(f"cannot prepare {settings.data_dir}: {exc.strerror or exc}")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
