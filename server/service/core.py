"""State every part of :class:`~semla.server.service.RegistryService` shares: the database, the
blob store, the publish locks (a thread lock in one process, a PostgreSQL advisory lock across
replicas) and the re-signing of the TUF metadata after a committed change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from semla.server.bases import BaseCardStore
from semla.server.blobs import BlobStore
from semla.server.db import Publisher, RecentRead, autocommit_reads, library_version
from semla.server.settings import DEFAULT_EPSILON_BUDGET, DEFAULT_MIN_SAMPLES

logger = logging.getLogger(__name__)

__all__ = ["ServiceCore", "lock_publishing"]


#: pg_advisory_xact_lock key that serialises publishing across replicas ("SemLA" in ASCII).
_PUBLISH_LOCK_KEY = 0x53656D4C41


def _owner_chains(rotations: Mapping[str, str | None]) -> dict[str, list[str]]:
    """key id → every key id of its publisher (its rotation chain), oldest first."""
    previous = {new: old for old, new in rotations.items() if new is not None}
    chains: dict[str, list[str]] = {}
    for key_id in rotations:
        first = key_id
        while first in previous and previous[first] != key_id:
            first = previous[first]
        chain = [first]
        while rotations.get(chain[-1]) is not None and rotations[chain[-1]] not in chain:
            chain.append(rotations[chain[-1]])
        chains[key_id] = chain
    return chains


def lock_publishing(session: Session) -> None:
    """Serialise "reuse or write blobs → commit" and "discard unreferenced blobs" (and the TUF
    re-signing) across replicas sharing one PostgreSQL database (held until the transaction
    ends). Without it a failing upload could delete a blob that a concurrent upload reused but
    had not committed yet. One process is already serialised by ``ServiceCore._publish_lock``."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PUBLISH_LOCK_KEY})


class ServiceCore:
    """State shared by the parts of the registry service: one database, one blob store, the
    publish locks.

    Args:
        sessions: Session factory bound to the registry database.
        blobs: Where bundle files are stored.
        reads: Opens an autocommit connection to the same database for a single-statement read
            (the app passes its read engine's ``connect``; None: ``sessions``' pool, switched per read).
        recheck_s: How long retrieval trusts the library version it last read before reading it
            again (0: on every request). A change made through this service is seen at once; one
            made elsewhere (another replica, the CLI) within this long.
    """

    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, uploads_per_minute: int = 0,
        min_samples: int = DEFAULT_MIN_SAMPLES, epsilon_budget: float | None = DEFAULT_EPSILON_BUDGET,
        base_cards: BaseCardStore | None = None, reads: Callable[[], AbstractContextManager[Any]] | None = None,
        recheck_s: float = 0.0,
    ) -> None:
        self._sessions = sessions
        #: Connections for single-statement reads, in autocommit (``reads``; by default ``sessions``' pool
        #: switched to autocommit per read): on PostgreSQL a read is then one round trip instead of
        #: BEGIN, SELECT, ROLLBACK. Anything that reads twice and needs both reads from one
        #: snapshot, or writes, uses ``_sessions``.
        self._reads = reads if reads is not None else autocommit_reads(sessions)
        self.base_cards = base_cards if base_cards is not None else BaseCardStore(None)
        self._min_samples = min_samples
        self._epsilon_budget = epsilon_budget
        self._blobs = blobs
        self._uploads_per_minute = uploads_per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, last refill)
        # Serialises "check version → write blobs → commit → clean up" inside one process,
        # so two uploads here never race; across replicas the UNIQUE constraint decides.
        self._publish_lock = threading.Lock()
        #: Re-signs the TUF metadata after each change (:class:`semla.server.tufsync.TufSync`; set by create_app).
        self.tuf: Any = None
        #: base fingerprint → its retrieval table (``retrieval.BaseTable``), and the lock its updates take
        self._tables: dict[str, Any] = {}
        self._tables_lock = threading.Lock()
        #: The library version retrieval checks its tables against (:meth:`_committed` invalidates it).
        self._library_version = RecentRead(self._read_library_version, recheck_s)

    @property
    def epsilon_budget(self) -> float | None:
        """The DP ε each publisher may spend on centroids; None: no limit."""
        return self._epsilon_budget

    @staticmethod
    def _owner_chain(session: Session, key_id: str) -> list[str]:
        """Every key of ``key_id``'s publisher (its rotation chain), oldest first."""
        rows = session.execute(select(Publisher.key_id, Publisher.rotated_to)).all()
        return _owner_chains(dict(rows)).get(key_id, [key_id])


    def _read_library_version(self) -> int:
        with self._reads() as conn:
            return library_version(conn)

    def _committed(self, names: list[str] | tuple[str, ...] = (), *, keys: bool = False,
                   publisher: str | None = None) -> None:
        """After a change is committed: retrieval reads the library version again, and the TUF
        metadata the change touched is re-signed under the publish locks. A signing failure is
        logged, never answered: the change is committed, and ``semla-server tuf rebuild`` repairs."""
        self._library_version.invalidate()
        if self.tuf is None:
            return
        try:
            with self._publish_lock, self._sessions() as session:
                self._lock_publishing(session)
                self.tuf.changed(session, names, keys=keys, publisher=publisher)
                session.commit()  # ends the transaction: releases the advisory lock
        except Exception:
            logger.exception("signing the TUF metadata failed after a committed change (names %s); run "
                             "`semla-server tuf rebuild`", ", ".join(names) or "-")

    @staticmethod
    def _lock_publishing(session: Session) -> None:
        lock_publishing(session)
