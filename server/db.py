"""The registry's tables and engine factory (SQLAlchemy 2.0 typed ORM).

The schema lives here and only here: ``create_schema`` builds it at app start (Alembic
migrations will start from exactly these tables). The same code runs on SQLite (embedded
default, WAL) and PostgreSQL (production).

Blobs are not stored in the database: ``adapter_files`` records each file's sha256, and the
bytes live in the content-addressed :class:`~semla.server.blobs.BlobStore`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker, Session

__all__ = [
    "Base",
    "Publisher",
    "Adapter",
    "AdapterFile",
    "make_engine",
    "make_sessionmaker",
    "create_schema",
    "utcnow",
    "iso_utc",
]

#: How long a SQLite writer waits for another writer's lock before giving up (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(moment: datetime) -> str:
    """Format a timestamp as ``2026-01-01T00:00:00Z`` (SQLite hands back naive UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Base(DeclarativeBase):
    pass


class Publisher(Base):
    """A registered Ed25519 publisher key; only active keys can publish."""

    __tablename__ = "publishers"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(128), default="")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Adapter(Base):
    """One published version of an adapter (the manifest's indexed fields)."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapters_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(BigInteger)
    publisher_key_id: Mapped[str] = mapped_column(ForeignKey("publishers.key_id"), index=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    domain: Mapped[str] = mapped_column(Text, default="")
    sample_count: Mapped[int] = mapped_column(BigInteger)
    #: The manifest's centroid vectors as canonical JSON text (list of lists of floats).
    centroids: Mapped[str] = mapped_column(Text)
    #: When the registry accepted the upload (not the publisher's claimed created_at).
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    files: Mapped[list["AdapterFile"]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True
    )


class AdapterFile(Base):
    """One of the four bundle files of an adapter version, by content address."""

    __tablename__ = "adapter_files"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    filename: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    adapter: Mapped[Adapter] = relationship(back_populates="files")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a database URL.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet."""
    Base.metadata.create_all(engine)
