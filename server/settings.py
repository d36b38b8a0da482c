"""Registry server settings, read from ``SEMLA_*`` environment variables (pydantic-settings).

Nothing is read or created at import: build a :class:`ServerSettings` and hand it to
:func:`semla.server.create_app`. Flags of ``semla-server`` override the environment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from semla.registry.asgi import BodyLimits
from semla.registry.privacy import DEFAULT_MIN_SAMPLES  # re-exported: one sample floor for owners and registry

__all__ = ["ServerSettings", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MIN_SAMPLES", "DEFAULT_EPSILON_BUDGET"]

DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_EPSILON_BUDGET = 10.0
#: Values of SEMLA_EPSILON_BUDGET that mean "no limit".
_NO_LIMIT = ("", "none", "inf", "infinity", "unlimited")


class ServerSettings(BaseSettings):
    """Everything the registry server needs to start.

    Attributes:
        data_dir: Holds the blob store (``blobs/``) and, by default, the SQLite database.
        host: Interface to listen on.
        port: TCP port to listen on.
        admin_token: Bearer token for admin endpoints (key registration). When unset, every
            admin endpoint answers 503: nobody can register keys by accident.
        database_url: SQLAlchemy URL; default ``sqlite:///{data_dir}/registry.db``. A
            ``postgresql+psycopg://...`` URL works with the same code.
        max_upload_bytes: Largest accepted upload body (checked on Content-Length and on the
            bytes actually read).
        min_samples: The registry's own floor on a manifest's ``sample_count``, whatever the
            publisher's ``privacy.min_samples`` says (``too_few_samples`` below it).
        epsilon_budget: The DP ε each publisher may spend on centroids, over all its uploads and
            the keys of its rotation chain; an upload that would take the total above it is
            refused (``privacy_budget``). ``SEMLA_EPSILON_BUDGET`` empty, ``none`` or ``inf``
            means no limit (spend is still recorded and shown); ``0`` refuses every DP upload.
            Uploads without DP carry no ε and are not charged.
        max_json_bytes: Largest JSON request body (key registration, rotation, revocation,
            retrieval); its nesting, number of arrays/objects and number lengths are bounded too.
        body_idle_timeout_s / body_min_rate / body_grace_s: a request body must keep arriving:
            no pause longer than ``body_idle_timeout_s``, and after ``body_grace_s`` at least
            ``body_min_rate`` bytes/s on average; else 408 ``body_timeout`` and the connection closes.
        metrics: Serve ``/metrics`` (Prometheus) and count requests.
        log_format: ``text`` or ``json`` logs of ``semla-server`` (``SEMLA_LOG_FORMAT``).
        compute_threads: BLAS/OpenMP threads of the ``semla-server`` process (``SEMLA_COMPUTE_THREADS``).
        retrieval_recheck_s: How long ``POST /v1/retrieve`` trusts the library version it last
            read before reading it again (``SEMLA_RETRIEVAL_RECHECK_S``; 0: on every request).
            Changes made through this replica are seen at once, another replica's within this long.
    """

    model_config = SettingsConfigDict(env_prefix="SEMLA_", extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path("./semla-data"), description="blob store and default SQLite database")
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=1, le=65535)
    #: A secret: ``SecretStr`` keeps it out of reprs and logs. Empty means unset.
    admin_token: SecretStr | None = None
    database_url: str | None = None
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, ge=1)
    #: The registry's own Ed25519 key that signs index snapshots (created on first start).
    registry_key_file: Path | None = None
    #: Uploads each publisher key may make per minute (per replica); 0 disables the limit.
    uploads_per_minute: int = Field(default=60, ge=0)
    #: How long a signed index snapshot is valid; nodes refuse an expired one.
    index_ttl_seconds: int = Field(default=86400, ge=60)
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    epsilon_budget: float | None = Field(default=DEFAULT_EPSILON_BUDGET, ge=0)
    max_json_bytes: int = Field(default=BodyLimits.max_body_bytes, ge=1024, le=64 * 1024 * 1024)
    body_idle_timeout_s: float = Field(default=BodyLimits.idle_timeout_s, gt=0, le=3600)
    body_min_rate: float = Field(default=BodyLimits.min_rate, gt=0)
    body_grace_s: float = Field(default=BodyLimits.grace_s, ge=0, le=3600)
    #: Serve Prometheus metrics at ``/metrics`` and count requests (``SEMLA_METRICS=false`` turns both off).
    metrics: bool = True
    #: ``text`` (uvicorn's lines) or ``json`` (one object per line); read by ``semla-server``.
    log_format: Literal["text", "json"] = "text"
    #: Threads one request's numerical work may use (BLAS, FAISS's OpenMP), set by ``semla-server``
    #: for its process. Concurrent requests are the parallelism: with the libraries' default (one
    #: thread per core each) eight concurrent retrievals on two cores ran 3x slower than with one.
    compute_threads: int = Field(default=1, ge=1, le=1024)
    #: One primary-key read of the library version per retrieval cost as much CPU as half the
    #: product over 100k centroids (measured under load on SQLite); read at most this often.
    retrieval_recheck_s: float = Field(default=0.1, ge=0, le=60)

    def body_limits(self) -> BodyLimits:
        """The request-body bounds these settings describe."""
        return BodyLimits(max_body_bytes=self.max_json_bytes,
                          json=dataclasses.replace(BodyLimits.json, max_bytes=self.max_json_bytes),
                          idle_timeout_s=self.body_idle_timeout_s, min_rate=self.body_min_rate,
                          grace_s=self.body_grace_s)

    @field_validator("epsilon_budget", mode="before")
    @classmethod
    def _no_limit(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in _NO_LIMIT:
            return None
        if isinstance(value, float) and value == float("inf"):
            return None
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def base_cards_dir(self) -> Path:
        """Where ``semla-server bases add`` keeps the base cards it adds (beside the blobs)."""
        return self.data_dir / "bases"

    @property
    def resolved_registry_key_file(self) -> Path:
        return self.registry_key_file or self.data_dir / "registry.key"

    @field_validator("admin_token", mode="after")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _empty_url_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @property
    def resolved_database_url(self) -> str:
        """``database_url``, or the SQLite file inside ``data_dir`` when it is unset."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'registry.db'}"
