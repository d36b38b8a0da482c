"""The database's view of the TUF repository: what each change must re-sign.

:class:`TufSync` is what :class:`~semla.server.service.RegistryService` calls after a change
commits (publish, revoke a version or a key, register or rotate a key), under its publish lock
(thread lock + PostgreSQL advisory lock). It reads the current state of the touched names and
the active publisher keys from the database inside that lock and hands them to
:class:`~semla.server.tufrepo.TufRepository`, which takes its own file lock and writes the
touched bins, snapshot and timestamp. Reading after the commit, under the lock, makes every
sync idempotent: whichever replica writes last writes what the database holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from semla.schemas import IndexKey
from semla.server.db import Adapter, AdapterFile, Publisher
from semla.server.service import _summary, live_adapter
from semla.server.tufrepo import Listed, NameState, TufRepository

logger = logging.getLogger(__name__)

__all__ = ["TufSync", "active_keys", "ensure_repository", "legacy_keys", "listed_all", "names_state"]

#: Names read per query (bounded IN lists).
_CHUNK = 500


def active_keys(session: Session) -> list[IndexKey]:
    """The publisher keys nodes verify manifests with: every active key (rotated ones too: their
    adapters stay valid)."""
    rows = session.scalars(select(Publisher).where(Publisher.active.is_(True)).order_by(Publisher.key_id))
    return [IndexKey(key_id=r.key_id, public_key=r.public_key) for r in rows]


def _files(session: Session, ids: list[int]) -> dict[int, dict[str, tuple[str, int]]]:
    out: dict[int, dict[str, tuple[str, int]]] = {i: {} for i in ids}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for f in session.scalars(select(AdapterFile).where(AdapterFile.adapter_id.in_(chunk))):
            out[f.adapter_id][f.filename] = (f.sha256, f.size)
    return out


def names_state(session: Session, names: Iterable[str]) -> dict[str, NameState]:
    """Every stored version of each name, and its newest live version (with its files)."""
    names = sorted(set(names))
    versions: dict[str, list[int]] = {n: [] for n in names}
    newest: dict[str, Adapter] = {}
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        for name, version in session.execute(select(Adapter.name, Adapter.version).where(Adapter.name.in_(chunk))):
            versions[name].append(version)
        for row in session.scalars(select(Adapter).where(Adapter.name.in_(chunk), live_adapter())
                                   .order_by(Adapter.version.desc())):
            newest.setdefault(row.name, row)
    files = _files(session, [r.id for r in newest.values()])
    return {n: NameState(versions=versions[n],
                         current=Listed(_summary(newest[n]), files[newest[n].id]) if n in newest else None)
            for n in names}


def listed_all(session: Session) -> list[Listed]:
    """The newest live version of every name, with its files (what ``tuf rebuild`` lists)."""
    newest: dict[str, Adapter] = {}
    for row in session.scalars(select(Adapter).where(live_adapter()).order_by(Adapter.name, Adapter.version.desc())):
        newest.setdefault(row.name, row)
    files = _files(session, [r.id for r in newest.values()])
    return [Listed(_summary(r), files[r.id]) for r in newest.values()]


class TufSync:
    """Re-signs the TUF metadata a database change touched (see the module docstring)."""

    def __init__(self, repo: TufRepository) -> None:
        self.repo = repo

    def changed(self, session: Session, names: Iterable[str] = (), *, keys: bool = False,
                publisher: str | None = None) -> int | None:
        """Sync ``names`` (plus every name ``publisher`` published) and, with ``keys``, the key list.

        Call inside the registry's publish lock. Returns the new snapshot version or None.
        """
        names = set(names)
        if publisher is not None:
            names |= set(session.scalars(select(Adapter.name).where(Adapter.publisher_key_id == publisher).distinct()))
        state = names_state(session, names)
        with self.repo.lock():
            return self.repo.sync(state, active_keys(session) if keys else None)

    def rebuild(self, session: Session) -> int | None:
        """Recompute every bin from the database."""
        listed = listed_all(session)
        with self.repo.lock():
            return self.repo.rebuild(listed, active_keys(session))


def legacy_keys(key_file: Path) -> list:
    """The registry keys nodes may have pinned before TUF: the current one and every key it was
    rotated from (kept beside it as ``<key_file>.<key id>``); none when there never was one."""
    from semla.registry import keys as _keys

    key_file = Path(key_file)
    if not key_file.exists():
        return []
    found = [_keys.load_private_key(key_file)]
    for path in sorted(key_file.parent.glob(key_file.name + ".*")):
        if len(path.name) == len(key_file.name) + 17 and not path.name.endswith(".pub"):
            found.append(_keys.load_private_key(path))
    return found


def ensure_repository(directory: Path, sessions, *, legacy_key_file: Path, timestamp_ttl: int) -> TufRepository:
    """The data dir's TUF repository, created on first start when absent (one root key, 1 of 1,
    written to ``DIRECTORY/root-keys/``: move it offline, or create the repository with
    ``semla-server tuf init`` instead), then filled from the database. Replicas starting together
    create it once (a file lock)."""
    from semla.registry import keys as _keys

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".init.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not TufRepository.initialized(directory):
            root_dir = directory / "root-keys"
            root_dir.mkdir(exist_ok=True)
            root_key = _keys.generate_key()
            with contextlib.suppress(Exception):
                (root_dir / "root-1.key").unlink()
                (root_dir / "root-1.key.pub").unlink()
            _keys.save_keypair(root_key, root_dir / "root-1.key")
            logger.warning("created a TUF repository with one root key in %s: move it offline (or use "
                           "`semla-server tuf init` for k-of-n root keys)", root_dir)
            repo = TufRepository.create(directory, [root_key], 1, legacy_keys=legacy_keys(legacy_key_file),
                                        timestamp_ttl=timestamp_ttl)
            with sessions() as session:
                TufSync(repo).rebuild(session)
    finally:
        os.close(fd)
    return TufRepository(directory, timestamp_ttl=timestamp_ttl)
