"""The registry's tables and engine factory (SQLAlchemy 2.0 typed ORM).

The ORM models live here; the schema itself is built and changed only by the Alembic
migrations shipped in ``semla/server/migrations`` (``0001``: the first tables; ``0002``: revocation; ``0003``: key rotation;
``0004``: the DP ε of each adapter's centroid, the publishers' privacy ledger; ``0005``: the
library version counter; ``0006``: each adapter's signed spread; ``0007``: each adapter's
listing entry; ``0008``: change stamps; ``0009``: on PostgreSQL, that entry kept in the row).
:func:`upgrade` migrates a database to the head revision (``semla-server db upgrade``);
:func:`check_schema` is what the server runs at start: it refuses a database whose revision
is not this code's head, and creates the schema itself only in an empty SQLite database (the
embedded default, so a fresh ``--data-dir`` works with zero steps). The same code runs on
SQLite (embedded default, WAL) and PostgreSQL (production, ``postgresql+psycopg://``).

Blobs are not stored in the database: ``adapter_files`` records each file's sha256, and the
bytes live in the content-addressed :class:`~semla.server.blobs.BlobStore`.
"""

from __future__ import annotations

import functools
import select as _select
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker, Session

from semla.schemas.errors import SchemaError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Select

__all__ = [
    "Base",
    "Publisher",
    "Adapter",
    "AdapterFile",
    "LibraryVersion",
    "library_version",
    "library_version_select",
    "bump_library_version",
    "RecentRead",
    "make_engine",
    "autocommit_reads",
    "make_sessionmaker",
    "SchemaError",
    "MIGRATIONS_DIR",
    "alembic_config",
    "migration_connection",
    "head_revision",
    "current_revision",
    "upgrade",
    "check_schema",
    "utcnow",
    "iso_utc",
]

#: The Alembic scripts (env.py, versions/), shipped as package data next to this module.
MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
#: The tables revision 0001 creates (a database holding exactly these and no
#: ``alembic_version`` was made by ``create_all`` before migrations existed).
_INITIAL_REVISION = "0001"
_INITIAL_TABLES = frozenset({"publishers", "adapters", "adapter_files"})
#: The one row of ``library_version``.
_LIBRARY_ROW = 1
_VERSION_TABLE = "alembic_version"
_UPGRADE_HINT = "run `semla-server db upgrade` with the same --database-url / SEMLA_DATABASE_URL"

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
    #: The key this one was rotated to (signed by this key): it publishes no more, but the
    #: adapters it signed stay valid, and its names pass to the new key.
    rotated_to: Mapped[str | None] = mapped_column(String(16), nullable=True, default=None)


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
    #: When its publisher revoked this version (signed request); revoked versions leave the index.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, default=None)
    #: The manifest's DP budget on the centroid (``privacy.epsilon``/``delta``), None without DP:
    #: the publisher's privacy ledger is the sum over its rows (revoking refunds nothing).
    privacy_epsilon: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)
    privacy_delta: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)
    #: The manifest's spread quantiles [q50, q90, q99] as canonical JSON text (schema 2), None for
    #: version-1 manifests.
    spread: Mapped[str | None] = mapped_column(Text, nullable=True, default=None)
    #: This version's entry in the listings (an ``AdapterSummary`` as JSON text), composed when the
    #: row is written and again when it is revoked: a listing page joins 100 of these, nothing else.
    summary: Mapped[str] = mapped_column(Text)
    #: The library version whose transaction last changed this row's standing (published, or
    #: it or its key revoked): caches of the library (the retrieval table) read the names
    #: changed since their own version instead of the whole library. None on rows not changed
    #: since the column was added.
    changed_in: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=None, index=True)

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


class LibraryVersion(Base):
    """The library's version: one row, raised by one in every transaction that changes what the
    index holds (publish, revoke a version, register, revoke or rotate a key).

    It is what nodes see as the index version (strictly increasing: a lower one is a rollback)
    and what caches of the library (the retrieval table) are keyed by. Bumping it in the
    writing transaction makes the change and the new version visible together, on every
    replica; reading it is one primary-key lookup.
    """

    __tablename__ = "library_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


@functools.cache  # statements are immutable; building one costs more than the lookup itself
def library_version_select() -> Select[tuple[int]]:
    """``SELECT version FROM library_version`` (use ``.scalar_subquery()`` inside a larger query)."""
    return select(LibraryVersion.version).where(LibraryVersion.id == _LIBRARY_ROW)


def library_version(session: Session | Connection) -> int:
    """The library version now (one primary-key lookup)."""
    return int(session.execute(library_version_select()).scalar_one())


def bump_library_version(session: Session | Connection, changed: Any = None) -> int:
    """Raise the library version by one inside the caller's transaction and return it; with
    ``changed`` (a where-clause on :class:`Adapter`), stamp those rows' ``changed_in`` with it.

    Call it last before the commit: on PostgreSQL the row stays locked until the transaction
    ends, which orders concurrent writers (on SQLite the database write lock does), so a reader
    that sees version V also sees every row stamped V or lower.
    """
    version = int(session.execute(update(LibraryVersion).where(LibraryVersion.id == _LIBRARY_ROW)
                                  .values(version=LibraryVersion.version + 1)
                                  .returning(LibraryVersion.version)).scalar_one())
    if changed is not None:
        session.execute(update(Adapter).where(changed).values(changed_in=version)
                        .execution_options(synchronize_session=False))
    return version


_T = TypeVar("_T")


class RecentRead(Generic[_T]):
    """A value read from the database, reused for ``seconds`` (a number, or a callable asked at
    each use) until :meth:`invalidate` says this process changed what it reads.

    A read that overlapped an invalidation is answered but not kept: it may predate the change,
    so the next call reads again. Concurrent callers share one read.
    """

    def __init__(self, read: Callable[[], _T], seconds: float | Callable[[], float]) -> None:
        self._read = read
        self._seconds = seconds
        self._lock = threading.Lock()
        self._kept: tuple[float, _T] | None = None  # (monotonic time just before the read, value)
        self._changes = 0  # invalidations so far

    def invalidate(self) -> None:
        """The database changed: the next call reads it again."""
        self._changes += 1
        self._kept = None

    def get(self) -> _T:
        """The value, read now unless the last read is recent enough and nothing changed since."""
        with self._lock:
            kept, changes, now = self._kept, self._changes, monotonic()
            seconds = self._seconds() if callable(self._seconds) else self._seconds
            if kept is not None and now - kept[0] < seconds:
                return kept[1]
            value = self._read()
            if self._changes == changes:
                self._kept = (now, value)
            return value


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


#: Connections a read pool keeps (``make_engine(autocommit=True)``), and how many more it may open
#: for a burst (closed again when returned). The default pool (5) is below the 8 or more reads a
#: busy server has in flight: every read past it opened a fresh connection, and on SQLite a fresh
#: connection starts with an empty page cache. 16 + 24 = the 40 threads a server runs handlers in.
READ_POOL_SIZE = 16
READ_POOL_OVERFLOW = 24


def make_engine(url: str, *, autocommit: bool = False) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout; psycopg
    (PostgreSQL) checks each pooled connection as it is handed out (:func:`_psycopg_checkout`),
    any other driver pings it (``pool_pre_ping``).

    ``autocommit``: every connection of its pool runs each statement as its own transaction, set
    once when it connects (the registry's single-statement reads: no BEGIN or ROLLBACK, and no
    isolation level switched back and forth on a shared pool's connection per request), and the
    pool keeps :data:`READ_POOL_SIZE` of them.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a database URL.
    """
    parsed = make_url(url)
    options: dict[str, Any] = {}
    if autocommit:
        options = {"isolation_level": "AUTOCOMMIT", "pool_size": READ_POOL_SIZE,
                   "max_overflow": READ_POOL_OVERFLOW}
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **options)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if parsed.get_driver_name() != "psycopg":
        return create_engine(parsed, pool_pre_ping=True, **options)
    engine = create_engine(parsed, **options)
    event.listen(engine, "checkout", functools.partial(_psycopg_checkout, engine))
    return engine


def _has_input(fd: int) -> bool:
    """Whether socket ``fd`` has bytes (or an end of stream, or an error) waiting, without blocking."""
    if hasattr(_select, "poll"):
        poller = _select.poll()
        poller.register(fd, _select.POLLIN)
        return bool(poller.poll(0))
    return bool(_select.select([fd], [], [], 0)[0])


def _psycopg_checkout(engine: Engine, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Hand out a pooled PostgreSQL connection only if it is alive, without a round trip when
    it plainly is (what ``pool_pre_ping`` costs on every checkout: a ``SELECT 1``, measured here
    at 0.2 ms of the machine's CPU, a fifth of a one-row read).

    An idle connection between statements has nothing to read: the server speaks only when
    asked. When the server ends it (a restart, ``pg_terminate_backend``, an idle timeout), its
    farewell or the end of the stream is waiting in the socket. So: a connection psycopg knows
    to be closed or broken is refused, one with input waiting is pinged as ``pool_pre_ping``
    would (a harmless message, say a notice, passes), and one with nothing waiting is handed
    out. A refused connection is replaced by a fresh one (``DisconnectionError``), so a
    database restart costs no request an error. What neither catches is a peer that vanished
    without closing (a cut network): the first statement fails, as it would after a ping.
    """
    conn = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if conn.closed or conn.broken:
        raise DisconnectionError("the pooled connection is closed")
    if _has_input(conn.fileno()):
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"the pooled connection was closed by the server: {exc}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def autocommit_reads(sessions: sessionmaker[Session]) -> Callable[[], AbstractContextManager[Connection | Session]]:
    """Connections for single-statement reads, in autocommit on ``sessions``' pool (each read switches
    its connection's isolation level and back; the registry app gives its service a pool of its own,
    ``make_engine(url, autocommit=True).connect``). ``sessions`` itself when it has no engine."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        return sessions
    return engine.execution_options(isolation_level="AUTOCOMMIT").connect


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the shipped migrations, built in code (no alembic.ini).

    Pass a live connection in ``config.attributes["connection"]`` (what :func:`upgrade` does)
    or a ``url`` for env.py to connect to.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction for running migrations, committed when the block ends.

    On SQLite, foreign keys are off while it runs. A batch operation there rebuilds a table
    (copy, drop, rename), and with foreign keys on, dropping the old ``adapters`` table would
    delete every ``adapter_files`` row (``ON DELETE CASCADE``). Before the commit, every row
    must still have its parent, or the transaction is rolled back. Foreign keys are back on
    when the connection returns to its pool.

    Raises:
        SchemaError: a migration left rows whose parent is missing (SQLite).
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:  # a no-op inside a transaction: set before the first write
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                yield conn
                orphans = conn.exec_driver_sql("PRAGMA foreign_key_check").all() if sqlite else []
                if orphans:
                    raise SchemaError(f"the migration left {len(orphans)} rows whose parent row is missing "
                                      f"(first: table {orphans[0][0]}); its transaction was rolled back")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


@functools.lru_cache(maxsize=1)
def _script():  # -> alembic.script.ScriptDirectory
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code ships (the one the server requires)."""
    head = _script().get_current_head()
    assert head is not None, f"no migrations under {MIGRATIONS_DIR}"
    return head


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    """The database's revision (``alembic_version``), or None when it has none."""
    with engine.connect() as conn:
        return _current(conn)


def _is_known(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _script().get_revision(revision) is not None
    except CommandError:  # ResolutionError (a CommandError) for an id no script defines
        return False


def _table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def upgrade(engine_or_url: Engine | str) -> str:
    """Migrate the database to the head revision; returns it.

    A database that holds exactly the initial tables but no revision (made by ``create_all``
    before migrations existed) is stamped with the initial revision first, not rebuilt.

    Raises:
        SchemaError: the database is at a revision this code does not know (newer release).
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable or a migration failed.
    """
    from alembic import command

    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        current = current_revision(engine)
        if current is not None and not _is_known(current):
            raise SchemaError(_unknown_message(current))
        config = alembic_config()
        with migration_connection(engine) as conn:
            config.attributes["connection"] = conn
            if current is None and _INITIAL_TABLES <= _table_names(conn):
                command.stamp(config, _INITIAL_REVISION)
            command.upgrade(config, "head")
        return head_revision()
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def _unknown_message(current: str) -> str:
    return (f"the database schema is at revision {current}, which this semla-server does not know "
            f"(its newest is {head_revision()}; written by a newer release?): upgrade semla-server")


def check_schema(engine: Engine, *, upgrade_if_empty: bool = False) -> str:
    """Make sure the database is at :func:`head_revision`; returns it.

    Args:
        upgrade_if_empty: create the schema when the database is empty (no tables at all).
            The server passes True only for SQLite, the embedded default.

    Raises:
        SchemaError: the database is empty (and ``upgrade_if_empty`` is False), predates
            migrations, is at an older revision, or at one this code does not know.
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable.
    """
    head = head_revision()
    with engine.connect() as conn:
        current = _current(conn)
        tables = _table_names(conn) if current is None else set()
    if current == head:
        return head
    if current is None:
        if tables:
            raise SchemaError("the database has tables but no schema revision (made before migrations?): "
                              + _UPGRADE_HINT)
        if not upgrade_if_empty:
            raise SchemaError(f"the database is empty (no registry schema): {_UPGRADE_HINT}")
        try:
            return upgrade(engine)
        except SQLAlchemyError:
            # Another process sharing this SQLite file may have created it meanwhile.
            if current_revision(engine) == head:
                return head
            raise
    if not _is_known(current):
        raise SchemaError(_unknown_message(current))
    raise SchemaError(f"the database schema is at revision {current}, this semla-server needs {head}: "
                      + _UPGRADE_HINT)
