"""Log formats of the two HTTP services (``semla-server``, ``semla-node serve``), torch-free.

Configured once, at the command-line edge: :func:`uvicorn_log_config` gives uvicorn (and the
``semla`` loggers) either its usual text lines or one JSON object per line, so a log shipper
parses them without regular expressions. Every JSON line has ``time`` (UTC, ISO 8601),
``level``, ``logger`` and ``message``; uvicorn's access lines add ``client``, ``method``,
``path``, ``http_version`` and ``status``; a logged exception adds ``exception`` (the
traceback as one string). The access log goes to stdout and everything else to stderr, in
both formats.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from semla.schemas.errors import InvalidInputError

__all__ = ["LOG_FORMATS", "LOG_FORMAT_ENV", "JsonFormatter", "resolve_log_format", "uvicorn_log_config"]

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "SEMLA_LOG_FORMAT"
#: uvicorn's access logger calls ``logger.info(fmt, client, method, path, http_version, status)``.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            out.update(zip(_ACCESS_FIELDS, record.args))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def resolve_log_format(flag: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The ``--log-format`` value, else ``SEMLA_LOG_FORMAT``, else ``text``.

    Raises:
        InvalidInputError: not one of :data:`LOG_FORMATS`.
    """
    value = flag if flag is not None else environ.get(LOG_FORMAT_ENV) or "text"
    value = value.strip().lower()
    if value not in LOG_FORMATS:
        raise InvalidInputError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {value!r} "
                                f"(--log-format / {LOG_FORMAT_ENV})", code="bad_log_format")
    return value


def uvicorn_log_config(log_format: str = "text", *, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``uvicorn.run(log_config=...)``: uvicorn's own config
    (access lines on stdout, the rest on stderr) with ``semla.*`` added, in the given format."""
    from uvicorn.config import LOGGING_CONFIG

    if log_format not in LOG_FORMATS:
        raise InvalidInputError(f"log format must be one of {', '.join(LOG_FORMATS)}", code="bad_log_format")
    config = copy.deepcopy(LOGGING_CONFIG)
    if log_format == "json":
        config["formatters"] = {"default": {"()": JsonFormatter}, "access": {"()": JsonFormatter}}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"][name]["level"] = level
    config["loggers"]["semla"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config
