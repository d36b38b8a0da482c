"""The registry's TUF repository (python-tuf): metadata signed when the library changes.

Layout in ``DATA_DIR/tuf/`` (see :mod:`semla.registry.tufindex` for what the targets are)::

    metadata/N.root.json  timestamp.json  N.snapshot.json  N.targets.json  N.bins-XXXX.json
    targets/adapters/...  (never written: adapter targets are served from the blob store)
    targets/shards/HASH.J.safetensors   targets/keys/HASH.publishers.json
    keys/{timestamp,snapshot,targets,bins}.key   online keys (Ed25519, PKCS#8 PEM, 0600)
    .lock

Root keys are files the operator holds offline (k of n sign each root). The online keys sign
timestamp, snapshot, the top-level targets (only its delegation to the bins) and the bins.

A change (publish, revoke a version or a key, a key registered or rotated) rewrites only the
bins it touches, their shards, the snapshot and the timestamp, each one version up; nothing
is signed per request. One writer at a time: an exclusive ``flock`` on ``.lock`` (processes on
one host, several app instances in one process) taken inside the registry's publish lock (a
PostgreSQL advisory lock across replicas); every update re-reads the current versions from
disk, so versions strictly increase whichever replica writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    Signed,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from semla.registry import keys as _keys
from semla.registry.fs import atomic_write
from semla.registry.tufindex import (
    BIN_PREFIX,
    DEFAULT_BIN_BITS,
    KEYS_TARGET,
    adapter_target,
    bin_for,
    decode_shard,
    encode_keys,
    encode_shard,
    shard_targets,
)
from semla.schemas import BUNDLE_FILES, MANIFEST_FILE, AdapterSummary, IndexKey
from semla.schemas.errors import InvalidInputError, NotFoundError

logger = logging.getLogger(__name__)

__all__ = ["TufRepository", "Listed", "NameState", "ONLINE_ROLES"]

ONLINE_ROLES = ("timestamp", "snapshot", "targets", "bins")
_EMPTY_BIN = "empty-bin.json"
_FIRST_BIN = re.compile(rf"^1\.{BIN_PREFIX}-[0-9a-f]{{1,4}}\.json$")
_COMPACT = JSONSerializer(compact=True)
#: Versions of a role's metadata kept beside the newest (clients mid-update still find theirs).
KEEP_VERSIONS = 8
ROOT_TTL = timedelta(days=365)
SNAPSHOT_TTL = timedelta(days=30)
TARGETS_TTL = timedelta(days=3 * 365)


@dataclass(frozen=True)
class Listed:
    """One listed adapter version: its summary and its files (name → (sha256, size))."""

    summary: AdapterSummary
    files: Mapping[str, tuple[str, int]]


@dataclass(frozen=True)
class NameState:
    """What the database says of one adapter name: every stored version, and the listed one."""

    versions: Sequence[int]
    current: Listed | None


@dataclass
class _Snap:
    version: int
    expires: datetime
    meta: dict[str, int]  # "NAME.json" → version


@dataclass
class _Bin:
    version: int
    targets: dict[str, TargetFile]
    shard: list[AdapterSummary] | None = None  # loaded on demand
    dirty: bool = False
    shard_dirty: bool = False
    expires: datetime | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _signer(key: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(key)


def _json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _dump(signed: dict, signer: CryptoSigner) -> bytes:
    """Sign a role's ``signed`` dict and serialise the metadata (compact JSON, sorted keys).

    The signed bytes are TUF's canonical JSON; for this metadata (ASCII names, integers, no
    floats) that is exactly ``json.dumps(sort_keys=True, separators=(",", ":"))``, which is
    what makes a snapshot of thousands of bins quick to sign (stock clients verify it).
    """
    signature = signer.sign(_json(signed))
    return _json({"signatures": [signature.to_dict()], "signed": signed})


class TufRepository:
    """The TUF metadata of one registry data dir.

    Args:
        directory: ``DATA_DIR/tuf``.
        timestamp_ttl: seconds a timestamp is valid (re-signed when half of it has passed).
    """

    def __init__(self, directory: Path, *, timestamp_ttl: int = 86400) -> None:
        self.directory = Path(directory)
        self.timestamp_ttl = timedelta(seconds=timestamp_ttl)
        if not self.initialized(self.directory):
            raise NotFoundError(f"no TUF repository in {self.directory}; run `semla-server tuf init`")
        self._signers = {role: _signer(_keys.load_private_key(self.directory / "keys" / f"{role}.key"))
                         for role in ONLINE_ROLES}
        self._stale_check: tuple[int, float] | None = None  # (timestamp mtime_ns, re-sign after)
        self._snapshot_cache: tuple[int, datetime, dict[str, int]] | None = None

    # -- layout ---------------------------------------------------------------------------------
    @staticmethod
    def initialized(directory: Path) -> bool:
        return (Path(directory) / "metadata" / "1.root.json").exists()

    @property
    def metadata_dir(self) -> Path:
        return self.directory / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.directory / "targets"

    def target_file(self, path: str, digest: str) -> Path:
        """Where a stored target lives, consistent-snapshot style (``dir/HASH.basename``)."""
        dirname, _, basename = path.rpartition("/")
        return self.targets_dir / dirname / f"{digest}.{basename}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time on this host (an exclusive flock; blocks until free)."""
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def metadata_bytes(self, filename: str) -> bytes:
        """The bytes of one metadata file (``1.bins-XXXX.json`` is the shared empty first bin).

        Raises:
            FileNotFoundError: no such file.
        """
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError:
            if not _FIRST_BIN.match(filename):
                raise
        return (self.directory / _EMPTY_BIN).read_bytes()

    def _write(self, name: str, md: Metadata) -> bytes:
        data = md.to_bytes(_COMPACT)
        atomic_write(self.metadata_dir / name, data)
        return data

    def _read(self, name: str) -> Metadata:
        return Metadata.from_bytes(self.metadata_bytes(name))

    # -- creation and root rotation -------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, root_keys: Sequence[Ed25519PrivateKey], threshold: int, *,
               bin_bits: int = DEFAULT_BIN_BITS, legacy_keys: Sequence[Ed25519PrivateKey] = (),
               timestamp_ttl: int = 86400) -> "TufRepository":
        """Write version 1 of every role: root (signed by ``threshold`` of ``root_keys`` and by
        every ``legacy_keys``, the registry keys nodes pinned before TUF), the top-level targets
        delegating to ``2**bin_bits`` empty bins, snapshot and timestamp; online keys are created.

        Raises:
            InvalidInputError: bad threshold or bin count, or a repository already exists.
        """
        directory = Path(directory)
        if cls.initialized(directory):
            raise InvalidInputError(f"{directory} already holds a TUF repository")
        if not 1 <= threshold <= len(root_keys):
            raise InvalidInputError(f"threshold {threshold} must lie in 1..{len(root_keys)} (the root keys)")
        if not 1 <= bin_bits <= 16:
            raise InvalidInputError("bins must be a power of two from 2 to 65536")
        for sub in ("metadata", "targets", "keys"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        online = {}
        for role in ONLINE_ROLES:
            path = directory / "keys" / f"{role}.key"
            if not path.exists():
                _keys.save_keypair(_keys.generate_key(), path)
            online[role] = _signer(_keys.load_private_key(path))
        now = _now()
        root = Root(version=1, expires=now + ROOT_TTL, consistent_snapshot=True)
        for key in root_keys:
            root.add_key(_signer(key).public_key, "root")
        root.roles["root"].threshold = threshold
        for role in ("timestamp", "snapshot", "targets"):
            root.add_key(online[role].public_key, role)
        md = Metadata(root)
        for key in list(root_keys)[:threshold]:
            md.sign(_signer(key), append=True)
        for key in legacy_keys:
            md.sign(_signer(key), append=True)
        data = md.to_bytes(_COMPACT)
        atomic_write(directory / "metadata" / "1.root.json", data)
        repo = cls.__new__(cls)
        repo.directory, repo.timestamp_ttl, repo._signers, repo._stale_check = (
            directory, timedelta(seconds=timestamp_ttl), online, None)
        repo._snapshot_cache = None
        succinct = SuccinctRoles(keyids=[online["bins"].public_key.keyid], threshold=1, bit_length=bin_bits,
                                 name_prefix=BIN_PREFIX)
        top = Targets(version=1, expires=now + TARGETS_TTL)
        top.delegations = Delegations(keys={online["bins"].public_key.keyid: online["bins"].public_key},
                                      roles=None, succinct_roles=succinct)
        repo._sign_write("targets", top)
        # Every bin's first version is the same empty role: signed once, kept once, served as each
        # 1.bins-XXXX.json (see metadata_bytes).
        atomic_write(directory / _EMPTY_BIN, _dump(Targets(version=1, expires=now + TARGETS_TTL).to_dict(),
                                                   online["bins"]))
        meta = {"targets.json": 1, **{f"{name}.json": 1 for name in succinct.get_roles()}}
        repo._write_snapshot(1, now + SNAPSHOT_TTL, meta)
        repo._write_timestamp(1)
        return repo

    def rotate_root(self, old_keys: Sequence[Ed25519PrivateKey], new_keys: Sequence[Ed25519PrivateKey],
                    threshold: int) -> int:
        """Write root N+1 with ``new_keys`` (k = ``threshold``), signed by the old keys given and
        ``threshold`` of the new ones. Nodes accept it only when the old keys reach the old threshold.

        Raises:
            InvalidInputError: fewer old keys than the current root's threshold, or a bad threshold.
        """
        if not 1 <= threshold <= len(new_keys):
            raise InvalidInputError(f"threshold {threshold} must lie in 1..{len(new_keys)} (the new root keys)")
        version = self.root_version()
        current = self._read(f"{version}.root.json").signed
        assert isinstance(current, Root)
        old_ids = set(current.roles["root"].keyids)
        signers = [_signer(k) for k in old_keys]
        valid = [s for s in signers if s.public_key.keyid in old_ids]
        if len(valid) < current.roles["root"].threshold:
            raise InvalidInputError(f"{len(valid)} of the given keys are current root keys; the root needs "
                                    f"{current.roles['root'].threshold} to sign its successor")
        for keyid in list(current.roles["root"].keyids):
            current.revoke_key(keyid, "root")
        for key in new_keys:
            current.add_key(_signer(key).public_key, "root")
        current.roles["root"].threshold = threshold
        current.version = version + 1
        current.expires = _now() + ROOT_TTL
        md = Metadata(current)
        for s in valid + [_signer(k) for k in list(new_keys)[:threshold]]:
            md.sign(s, append=True)
        with self.lock():
            self._write(f"{version + 1}.root.json", md)
        return version + 1

    def root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")]
        return max(versions)

    # -- signing --------------------------------------------------------------------------------
    def _sign_write(self, role: str, signed: Signed, name: str | None = None) -> None:
        filename = "timestamp.json" if role == "timestamp" else f"{signed.version}.{name or role}.json"
        atomic_write(self.metadata_dir / filename, _dump(signed.to_dict(), self._signers[role]))

    def _write_snapshot(self, version: int, expires: datetime, meta: Mapping[str, int]) -> None:
        signed = Snapshot(version=version, expires=expires).to_dict()
        signed["meta"] = {name: {"version": v} for name, v in meta.items()}
        atomic_write(self.metadata_dir / f"{version}.snapshot.json", _dump(signed, self._signers["snapshot"]))
        self._snapshot_cache = (version, expires, dict(meta))
        self._prune(f"{version - KEEP_VERSIONS}.snapshot.json")

    def _write_timestamp(self, snapshot_version: int, previous: int = 0) -> None:
        data = (self.metadata_dir / f"{snapshot_version}.snapshot.json").read_bytes()
        meta = MetaFile(version=snapshot_version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})
        self._sign_write("timestamp", Timestamp(version=previous + 1, expires=_now() + self.timestamp_ttl,
                                                snapshot_meta=meta))

    def _prune(self, filename: str) -> None:
        if not filename[0].isdigit() or filename.startswith("0.") or filename.startswith("-"):
            return
        (self.metadata_dir / filename).unlink(missing_ok=True)

    def _state(self) -> tuple[Timestamp, "_Snap", Targets]:
        ts = self._read("timestamp.json").signed
        version = ts.snapshot_meta.version
        cached = getattr(self, "_snapshot_cache", None)
        if cached is None or cached[0] != version:  # another writer moved on: read it (plain JSON, ours)
            signed = json.loads((self.metadata_dir / f"{version}.snapshot.json").read_bytes())["signed"]
            expires = datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            cached = (version, expires, {n: m["version"] for n, m in signed["meta"].items()})
            self._snapshot_cache = cached
        snap = _Snap(cached[0], cached[1], dict(cached[2]))
        top = self._read(f"{snap.meta['targets.json']}.targets.json").signed
        return ts, snap, top

    def _load_bin(self, snap: "_Snap", name: str) -> _Bin:
        signed = self._read(f"{snap.meta[name + '.json']}.{name}.json").signed
        assert isinstance(signed, Targets)
        return _Bin(version=signed.version, targets=dict(signed.targets), expires=signed.expires)

    def _shard_rows(self, b: _Bin, shard_path: str) -> list[AdapterSummary]:
        if b.shard is None:
            info = b.targets.get(shard_path)
            b.shard = [] if info is None else decode_shard(
                self.target_file(shard_path, info.hashes["sha256"]).read_bytes())
        return b.shard

    def _put_target(self, path: str, data: bytes) -> TargetFile:
        digest = hashlib.sha256(data).hexdigest()
        out = self.target_file(path, digest)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, data)
        return TargetFile(length=len(data), hashes={"sha256": digest}, path=path)

    # -- changes --------------------------------------------------------------------------------
    def sync(self, names: Mapping[str, NameState], keys: Sequence[IndexKey] | None = None) -> int | None:
        """Bring the bins of ``names`` (and the publisher key list, when given) in line with the
        database; write the touched bins, their shards, the snapshot and the timestamp.

        Call with :meth:`lock` held (and the database's publish lock). Returns the new snapshot
        version, or None when nothing changed.
        """
        ts, snap, top = self._state()
        succinct = top.delegations.succinct_roles
        shard_paths = shard_targets(succinct.bit_length, succinct.name_prefix)
        bins: dict[str, _Bin] = {}

        def bin_for_(path: str) -> str:
            return bin_for(path, succinct.bit_length, succinct.name_prefix)

        def load(name: str) -> _Bin:
            if name not in bins:
                bins[name] = self._load_bin(snap, name)
            return bins[name]

        for name, state in names.items():
            prefix = f"adapters/{name}/"
            paths = {adapter_target(name, v, f) for v in state.versions for f in BUNDLE_FILES}
            touched = {bin_for_(p) for p in paths}
            for bin_name in touched:
                b = load(bin_name)
                stale = [p for p in b.targets if p.startswith(prefix)]
                for p in stale:
                    del b.targets[p]
                b.dirty |= bool(stale)
                rows = self._shard_rows(b, shard_paths[bin_name])
                kept = [a for a in rows if a.name != name]
                if len(kept) != len(rows):
                    b.shard, b.shard_dirty, b.dirty = kept, True, True
            if state.current is None:
                continue
            cur = state.current.summary
            for filename, (digest, size) in state.current.files.items():
                path = adapter_target(name, cur.version, filename)
                b = load(bin_for_(path))
                b.targets[path] = TargetFile(length=size, hashes={"sha256": digest}, path=path)
                b.dirty = True
            home = bin_for_(adapter_target(name, cur.version, MANIFEST_FILE))
            b = load(home)
            b.shard = self._shard_rows(b, shard_paths[home]) + [cur]
            b.shard_dirty = b.dirty = True
        if keys is not None:
            b = load(bin_for_(KEYS_TARGET))
            info = self._put_target(KEYS_TARGET, encode_keys(keys))
            if b.targets.get(KEYS_TARGET) != info:
                b.targets[KEYS_TARGET] = info
                b.dirty = True
        return self._commit(ts, snap, bins, shard_paths)

    def rebuild(self, listed: Sequence[Listed], keys: Sequence[IndexKey]) -> int | None:
        """Recompute every bin from the whole library (``tuf rebuild``); write the bins whose
        content differs (or that expire within 90 days). Call with :meth:`lock` held."""
        ts, snap, top = self._state()
        succinct = top.delegations.succinct_roles
        shard_paths = shard_targets(succinct.bit_length, succinct.name_prefix)

        def bin_for_(path: str) -> str:
            return bin_for(path, succinct.bit_length, succinct.name_prefix)

        wanted: dict[str, dict[str, TargetFile]] = {name: {} for name in succinct.get_roles()}
        rows: dict[str, list[AdapterSummary]] = {name: [] for name in wanted}
        for item in listed:
            a = item.summary
            for filename, (digest, size) in item.files.items():
                path = adapter_target(a.name, a.version, filename)
                wanted[bin_for_(path)][path] = TargetFile(size, {"sha256": digest}, path)
            rows[bin_for_(adapter_target(a.name, a.version, MANIFEST_FILE))].append(a)
        wanted[bin_for_(KEYS_TARGET)][KEYS_TARGET] = self._put_target(KEYS_TARGET,
                                                                                           encode_keys(keys))
        soon = _now() + timedelta(days=90)
        bins: dict[str, _Bin] = {}
        for name, targets in wanted.items():
            if rows[name]:
                targets[shard_paths[name]] = self._put_target(shard_paths[name], encode_shard(rows[name]))
            b = self._load_bin(snap, name)
            if b.targets != targets or (b.expires is not None and b.expires < soon):
                b.targets, b.dirty = targets, True
                bins[name] = b
        return self._commit(ts, snap, bins, shard_paths)

    def _commit(self, ts: Timestamp, snap: _Snap, bins: Mapping[str, _Bin], shard_paths: Mapping[str, str]
                ) -> int | None:
        changed = {name: b for name, b in bins.items() if b.dirty}
        if not changed:
            return None
        expires = _now() + TARGETS_TTL
        for name, b in changed.items():
            shard_path = shard_paths[name]
            if b.shard_dirty:
                b.targets.pop(shard_path, None)
                if b.shard:
                    b.targets[shard_path] = self._put_target(shard_path, encode_shard(b.shard))
            version = b.version + 1
            self._sign_write("bins", Targets(version=version, expires=expires, targets=b.targets), name)
            snap.meta[f"{name}.json"] = version
            self._prune(f"{version - KEEP_VERSIONS}.{name}.json")
        self._write_snapshot(snap.version + 1, _now() + SNAPSHOT_TTL, snap.meta)
        self._write_timestamp(snap.version + 1, ts.version)
        return snap.version + 1

    def refresh_if_stale(self) -> bool:
        """Re-sign the timestamp (and the snapshot) when half of its validity has passed.

        Cheap when nothing is due (one stat); True when it wrote new metadata.
        """
        path = self.metadata_dir / "timestamp.json"
        mtime = path.stat().st_mtime_ns
        now = _now()
        if self._stale_check is not None and self._stale_check[0] == mtime and now.timestamp() < self._stale_check[1]:
            return False
        ts = self._read("timestamp.json").signed
        due = ts.expires - self.timestamp_ttl / 2
        self._stale_check = (mtime, due.timestamp())
        if now < due:
            return False
        with self.lock():
            ts, snap, _ = self._state()
            if now < ts.expires - self.timestamp_ttl / 2:
                return False  # another writer was first
            version = snap.version
            if snap.expires - SNAPSHOT_TTL / 2 < now:
                version += 1
                self._write_snapshot(version, now + SNAPSHOT_TTL, snap.meta)
            self._write_timestamp(version, ts.version)
        logger.info("re-signed the TUF timestamp (it expires in %s)", self.timestamp_ttl)
        return True

    def snapshot_version(self) -> int:
        return self._read("timestamp.json").signed.snapshot_meta.version
