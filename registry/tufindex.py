"""The library as TUF metadata (python-tuf): the layout both sides share, and the node's sync.

The registry publishes standard TUF metadata (root, targets, snapshot, timestamp; consistent
snapshots) under ``/tuf/metadata/`` and targets under ``/tuf/targets/``:

- every file of a listed adapter version is the target ``adapters/NAME/VERSION/FILENAME``;
- the top-level targets role delegates every target through succinct hashed bins (TAP 15),
  ``bins-0000`` .. ``bins-1fff`` for 8192 bins, signed by one online key;
- each non-empty bin also carries one *shard*: a safetensors file with the centroids and the
  summary fields retrieval needs of the adapters whose ``manifest.json`` target lies in the bin.
  A shard's target path is the first ``shards/J.safetensors`` (J = 0, 1, ...) that hashes into
  its bin (:func:`shard_targets`), so a stock TUF client finds it like any other target;
- ``keys/publishers.json``: the active publisher keys (nodes verify every bundle's manifest
  signature against them, on top of TUF).

A bin at version 1 is empty (the registry never writes content into a first version), so a node
reads only the bins that changed since its last refresh: metadata, then shards. Rollback,
freeze, mix-and-match, fast-forward and endless-data protection come from ``tuf.ngclient``.

This module is torch-free (the registry server imports the layout and shard codec).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError
from securesystemslib.signer import SSlibKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from semla.registry.fs import atomic_write
from semla.schemas import AdapterSummary, IndexKey
from semla.schemas.errors import RegistryError, SignatureError, VerificationError

logger = logging.getLogger(__name__)

__all__ = [
    "BIN_PREFIX",
    "DEFAULT_BIN_BITS",
    "KEYS_TARGET",
    "LibraryChange",
    "MAX_SHARD_BYTES",
    "TufIndex",
    "BoundedFetcher",
    "adapter_target",
    "bin_for",
    "by_name_version",
    "spliced_list",
    "decode_shard",
    "encode_shard",
    "encode_keys",
    "decode_keys",
    "shard_targets",
    "updater_config",
]

BIN_PREFIX = "bins"
#: 2**13 = 8192 bins: about 120 adapters a bin at a million adapters.
DEFAULT_BIN_BITS = 13
KEYS_TARGET = "keys/publishers.json"
SHARD_FORMAT = "semla-shard-v2"
#: What registries wrote before: nodes still read it.
SHARD_FORMAT_V1 = "semla-shard-v1"
#: Largest shard a node downloads (a bin's targets name its length; this bounds it again).
MAX_SHARD_BYTES = 256 << 20
#: Largest publisher key list (bytes).
MAX_KEYS_BYTES = 64 << 20
#: Most adapters one shard may list.
MAX_SHARD_ADAPTERS = 1 << 20
#: Bins one ``tuf.ngclient.Updater`` verifies before the node starts a fresh one: ngclient keeps
#: every delegated role it loaded in memory (about 3 GB for the 8192 bins of a million adapters),
#: so a sync walks the bins in batches and memory stays bounded by one batch.
BIN_BATCH = 512
#: A sync whose snapshot moved under it (the registry changed mid-walk) starts again, at most
#: this many times; the bins it already has at the new snapshot's versions are kept.
MAX_SYNC_WALKS = 4


def updater_config() -> UpdaterConfig:
    """Size caps for every metadata download (a hostile registry cannot send endless data)."""
    return UpdaterConfig(max_root_rotations=64, max_delegations=8, root_max_length=512 << 10,
                         timestamp_max_length=16 << 10, snapshot_max_length=16 << 20,
                         targets_max_length=32 << 20)


def adapter_target(name: str, version: int, filename: str) -> str:
    return f"adapters/{name}/{version}/{filename}"


def bin_for(path: str, bit_length: int, name_prefix: str = BIN_PREFIX) -> str:
    """The bin a target path falls in: TAP 15's rule, as ``SuccinctRoles.get_role_for_target``
    computes it (the leading ``bit_length`` bits of sha256(path)); tested equal to it."""
    number = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:4], "big") >> (32 - bit_length)
    return f"{name_prefix}-{number:0{len(f'{2**bit_length - 1:x}')}x}"


@functools.lru_cache(maxsize=4)
def shard_targets(bit_length: int, name_prefix: str = BIN_PREFIX) -> dict[str, str]:
    """bin name → the target path of its shard: the first ``shards/J.safetensors`` hashing into it."""
    out: dict[str, str] = {}
    j = 0
    while len(out) < 2**bit_length:
        path = f"shards/{j}.safetensors"
        out.setdefault(bin_for(path, bit_length, name_prefix), path)
        j += 1
    return out


# -- shards ------------------------------------------------------------------------------------
#: The summary fields of a version-1 shard's adapter list, in order (read, no longer written).
_V1_FIELDS = ("name", "version", "publisher", "base_fingerprint", "domain", "sample_count",
              "manifest_sha256", "created_at", "spread")
#: A version-2 shard's adapter list: publisher and base as indices into per-shard tables,
#: ``created_at`` as Unix seconds (or the string, when it is not ``%Y-%m-%dT%H:%M:%SZ``), the
#: manifest hashes as a (n, 32) uint8 tensor. About 100 bytes an adapter besides its vectors,
#: against about 230 in version 1 (1.95x the raw centroids at a million 64-d adapters).
_V2_FIELDS = ("name", "version", "publisher", "base_fingerprint", "domain", "sample_count", "created_at", "spread")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _seconds(created_at: str) -> int | str:
    try:
        moment = datetime.strptime(created_at, _TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return created_at
    return int(moment.timestamp()) if moment.strftime(_TIME_FORMAT) == created_at else created_at


def _created_at(value: int | str) -> str:
    if isinstance(value, str):
        return value
    return datetime.fromtimestamp(value, timezone.utc).strftime(_TIME_FORMAT)


def encode_shard(summaries: Sequence[AdapterSummary]) -> bytes:
    """safetensors bytes (format ``semla-shard-v2``): per centroid dimension D, ``centroids.D``
    (n, D) float32 and ``owner.D`` (n,) int32 (index into the adapter list); ``manifest_sha256``
    (A, 32) uint8; the header metadata holds the adapter list and its publisher and base tables."""
    from safetensors.numpy import save

    summaries = sorted(summaries, key=lambda a: (a.name, a.version))
    publishers = sorted({a.publisher for a in summaries})
    bases = sorted({a.base_fingerprint for a in summaries})
    publisher_at, base_at = {p: i for i, p in enumerate(publishers)}, {b: i for i, b in enumerate(bases)}
    rows: dict[int, tuple[list, list]] = {}
    for i, a in enumerate(summaries):
        for vector in a.centroids:
            vectors, owners = rows.setdefault(len(vector), ([], []))
            vectors.append(vector)
            owners.append(i)
    tensors = {"manifest_sha256": np.frombuffer(b"".join(bytes.fromhex(a.manifest_sha256) for a in summaries),
                                                dtype=np.uint8).reshape(len(summaries), 32)}
    for dim, (vectors, owners) in sorted(rows.items()):
        tensors[f"centroids.{dim}"] = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)
        tensors[f"owner.{dim}"] = np.asarray(owners, dtype=np.int32)
    listing = [[a.name, a.version, publisher_at[a.publisher], base_at[a.base_fingerprint], a.domain, a.sample_count,
                _seconds(a.created_at), a.spread] for a in summaries]
    compact = functools.partial(json.dumps, separators=(",", ":"))
    return save(tensors, metadata={"format": SHARD_FORMAT, "fields": compact(_V2_FIELDS),
                                   "publishers": compact(publishers), "bases": compact(bases),
                                   "adapters": compact(listing)})


def decode_shard(data: bytes) -> list[AdapterSummary]:
    """The adapters of one shard, version 2 or 1 (centroids as float32 values).

    Raises:
        VerificationError: ``shard_invalid``: not a shard this node can read.
    """
    from safetensors.numpy import load

    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
        fmt = meta.get("format")
        fields = {SHARD_FORMAT: _V2_FIELDS, SHARD_FORMAT_V1: _V1_FIELDS}.get(fmt)
        if fields is None or json.loads(meta["fields"]) != list(fields):
            raise _bad_shard("unknown format")
        listing = json.loads(meta["adapters"])
        tables = (json.loads(meta["publishers"]), json.loads(meta["bases"])) if fmt == SHARD_FORMAT else None
        tensors = load(data)
    except VerificationError:
        raise
    except Exception as exc:  # safetensors raises its own errors for a malformed file
        raise _bad_shard(str(exc)[:200]) from None
    if not isinstance(listing, list) or len(listing) > MAX_SHARD_ADAPTERS:
        raise _bad_shard("the adapter list is not a list or too long")
    centroids: list[list[list[float]]] = [[] for _ in listing]
    for key, vectors in tensors.items():
        kind, _, dim = key.partition(".")
        if kind in ("owner", "manifest_sha256"):
            continue
        owners = tensors.get(f"owner.{dim}")
        if kind != "centroids" or owners is None or vectors.ndim != 2 or owners.shape != (len(vectors),) \
                or vectors.dtype != np.float32 or not np.isfinite(vectors).all():
            raise _bad_shard(f"tensor {key!r}")
        if len(owners) and (owners.min() < 0 or owners.max() >= len(listing)):
            raise _bad_shard("a centroid names no adapter")
        for row, owner in zip(vectors.tolist(), owners.tolist()):
            centroids[owner].append(row)
    try:
        if tables is None:
            items = [dict(zip(_V1_FIELDS, item)) for item in listing]
        else:
            items = _v2_items(listing, tables, tensors.get("manifest_sha256"))
        return [AdapterSummary(**item, centroids=c) for item, c in zip(items, centroids)]
    except VerificationError:
        raise
    except (ValidationError, TypeError, ValueError, IndexError, OverflowError, OSError) as exc:
        raise _bad_shard(str(exc)[:200]) from None


def _bad_shard(why: str) -> VerificationError:
    return VerificationError(f"the shard is invalid: {why}", code="shard_invalid")


def _v2_items(listing: list, tables: tuple, hashes: np.ndarray | None) -> list[dict]:
    """A version-2 adapter list as summary fields (a malformed one raises VerificationError, or
    the TypeError, ValueError or IndexError its unpacking meets)."""
    publishers, bases = tables
    if hashes is None or hashes.dtype != np.uint8 or hashes.shape != (len(listing), 32):
        raise _bad_shard("manifest_sha256 is not a (n, 32) uint8 tensor")
    items = []
    for item, digest in zip(listing, hashes):
        name, version, publisher, base, domain, sample_count, created, spread = item
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in (publisher, base)):
            raise _bad_shard("publisher and base must be table indices")
        items.append({"name": name, "version": version, "publisher": publishers[publisher],
                      "base_fingerprint": bases[base], "domain": domain, "sample_count": sample_count,
                      "manifest_sha256": digest.tobytes().hex(), "created_at": _created_at(created),
                      "spread": spread})
    return items


def encode_keys(keys: Sequence[IndexKey]) -> bytes:
    from semla.schemas import canonical_json

    return canonical_json([k.model_dump() for k in sorted(keys, key=lambda k: k.key_id)])


def decode_keys(data: bytes) -> dict[str, bytes]:
    try:
        keys = [IndexKey.model_validate(k) for k in json.loads(data)]
        return {k.key_id: bytes.fromhex(k.public_key) for k in keys}
    except (ValueError, TypeError, ValidationError):
        raise VerificationError("the publisher key list is invalid", code="keys_invalid") from None


# -- the node's side ---------------------------------------------------------------------------
class BoundedFetcher(FetcherInterface):
    """``tuf.ngclient`` downloads over an ``httpx.Client`` (the node's registry client).

    ngclient bounds each download by the length its metadata records (or the config's caps)
    and stops reading past it; this streams in chunks so nothing larger is ever buffered.
    """

    def __init__(self, client: httpx.Client, chunk_size: int = 1 << 16) -> None:
        self._client = client
        self._chunk = chunk_size
        self.bytes_downloaded = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url)

    def _chunks(self, url: str) -> Iterator[bytes]:
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise tuf_errors.DownloadHTTPError(f"GET {url}: HTTP {response.status_code}", response.status_code)
                for chunk in response.iter_bytes(self._chunk):
                    self.bytes_downloaded += len(chunk)
                    yield chunk
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"cannot reach {url}: {exc}") from None


def legacy_keyid(public_raw: bytes) -> str:
    """The TUF key id of a raw Ed25519 public key (the registry key before TUF)."""
    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(public_raw)).keyid


def verify_legacy_root(data: bytes, public_raw: bytes) -> None:
    """Check that a TUF root carries a signature by the registry key a node pinned before TUF.

    Raises:
        SignatureError: ``registry_key``: not signed by that key (or not a root at all).
    """
    key = SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(public_raw))
    try:
        md = Metadata.from_bytes(data)
    except Exception:
        raise SignatureError("the registry's first TUF root is malformed", code="registry_key") from None
    sig = md.signatures.get(key.keyid)
    if not isinstance(md.signed, Root) or sig is None:
        raise SignatureError(f"the registry's first TUF root is not signed by the pinned registry key "
                             f"{key.keyid[:16]}", code="registry_key")
    try:
        key.verify_signature(sig, md.signed_bytes)
    except Exception:
        raise SignatureError("the registry's first TUF root has a bad signature by the pinned registry key",
                             code="registry_key") from None


def _convert(exc: Exception) -> Exception:
    """A python-tuf error as this project's error (the code names the attack it stopped)."""
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return VerificationError(f"the registry sent more bytes than the metadata records: {exc}", code="too_long")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        code = "unreachable" if exc.status_code >= 500 else "not_found" if exc.status_code == 404 else "http_error"
        return RegistryError(str(exc), code=code, status=exc.status_code)
    if isinstance(exc, tuf_errors.DownloadError):
        return RegistryError(str(exc), code="unreachable")
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return VerificationError(f"the registry's metadata expired (freeze refused): {exc}", code="index_expired")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return VerificationError(f"metadata version refused (rollback or mix-and-match): {exc}", code="rollback")
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return SignatureError(f"metadata not signed by a threshold of trusted keys: {exc}", code="tuf_signature")
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return VerificationError(f"a file does not match its signed length and hashes: {exc}", code="hash_mismatch")
    if isinstance(exc, tuf_errors.RepositoryError):
        return VerificationError(f"the registry's TUF metadata was refused: {exc}", code="tuf_invalid")
    return exc


@dataclass
class _Saved:
    version: int
    expires: float
    accepted_at: float


class TufIndex:
    """One node's verified copy of a registry's library, updated through ``tuf.ngclient``.

    Args:
        client: the registry's httpx client and base URL.
        directory: this registry's state on the node: ``metadata/`` (ngclient's trusted
            metadata), ``targets/`` (shards, the key list) and ``state.json``.
        root: a trusted root.json given out of band (first use only).
        legacy_key: the registry key a node pinned before TUF: the first root must carry its
            signature (the migration). Without either, the first root is trusted on first use.

    After :meth:`refresh`, ``bins`` maps every bin to (version, adapters), ``keys`` holds the
    publisher keys, ``version`` the snapshot version and ``expires`` the timestamp's expiry.
    """

    def __init__(self, client: httpx.Client, url: str, directory: Path, *, root: bytes | None = None,
                 legacy_key: bytes | None = None) -> None:
        self._client = client
        self.url = url.rstrip("/")
        self.directory = Path(directory)
        self._root = root
        self._legacy_key = legacy_key
        self.fetcher = BoundedFetcher(client)
        self.bins: dict[str, tuple[int, list[AdapterSummary]]] = {}
        self.keys: dict[str, bytes] = {}
        self.version: int | None = None
        self.expires: float | None = None
        self.changed: list[str] = []  # bins whose content the last refresh replaced
        self._library: list[AdapterSummary] | None = None  # library(), kept until the bins change
        self.change: LibraryChange | None = None  # how the last refresh that changed library() changed it

    @property
    def _metadata_dir(self) -> Path:
        return self.directory / "metadata"

    @property
    def _targets_dir(self) -> Path:
        return self.directory / "targets"

    def _bootstrap(self) -> bytes | None:
        """The root to start from: the trusted one on disk (None), given, or the registry's first."""
        if (self._metadata_dir / "root.json").exists():
            return None
        if self._root is not None:
            return self._root
        try:
            data = self.fetcher.download_bytes(f"{self.url}/tuf/metadata/1.root.json",
                                               updater_config().root_max_length)
        except tuf_errors.DownloadError as exc:
            raise _convert(exc) from None
        if self._legacy_key is not None:
            verify_legacy_root(data, self._legacy_key)
            logger.info("accepted the registry's first TUF root: signed by the pinned registry key")
        else:
            logger.warning("trusting the registry's first TUF root on first use (%s)", self.url)
        return data

    def refresh(self) -> list[str]:
        """Update through ngclient; download only the bins and shards that changed.

        Returns:
            The bins whose adapters changed (also in ``changed``).

        Raises:
            VerificationError, SignatureError: the metadata or a shard was refused (the state is
                unchanged).
            RegistryError: the registry cannot be reached (``unreachable``) or refused.
        """
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        self._targets_dir.mkdir(parents=True, exist_ok=True)
        known = dict(self.bins)  # (version, adapters) per bin, as verified so far
        try:
            for _ in range(MAX_SYNC_WALKS):
                walked = self._walk(known)
                if walked is not None:
                    break
            else:
                raise RegistryError(f"the registry's library changed during {MAX_SYNC_WALKS} syncs in a row; "
                                    "try again later", code="unreachable")
        except tuf_errors.RepositoryError as exc:
            raise _convert(exc) from None
        except tuf_errors.DownloadError as exc:
            raise _convert(exc) from None
        except OSError as exc:
            raise RegistryError(f"cannot keep the registry's metadata in {self.directory}: {exc}",
                                code="cache_error") from None
        bins, keys, snapshot, timestamp = walked
        changed = []
        for name, (version, adapters) in bins.items():
            old = self.bins.get(name)
            if (old is None or old[0] != version) and (adapters or (old is not None and old[1])):
                changed.append(name)
        if changed:
            gone = [a for name in changed if name in self.bins for a in self.bins[name][1]]
            came = sorted((a for name in changed for a in bins[name][1]), key=by_name_version)
            before, self._library = self._library, self._merged(gone, came)
            self.change = None if self._library is None else LibraryChange(before, gone, came)
        self.bins, self.keys, self.changed = bins, keys, changed
        self.version = snapshot.version
        self.expires = timestamp.expires.timestamp()
        self._save(time.time())
        return changed

    def _updater(self) -> tuple[Updater, Snapshot, Targets, Timestamp]:
        """A fresh ngclient Updater, refreshed (timestamp from the registry; the snapshot and
        targets from the node's trusted copies when still current), and what it now trusts."""
        updater = Updater(str(self._metadata_dir), f"{self.url}/tuf/metadata/", str(self._targets_dir),
                          f"{self.url}/tuf/targets/", fetcher=self.fetcher, config=updater_config(),
                          bootstrap=self._bootstrap())
        updater.refresh()
        snapshot = Metadata[Snapshot].from_bytes((self._metadata_dir / "snapshot.json").read_bytes()).signed
        top = Metadata[Targets].from_bytes((self._metadata_dir / "targets.json").read_bytes()).signed
        timestamp = Metadata[Timestamp].from_bytes((self._metadata_dir / "timestamp.json").read_bytes()).signed
        return updater, snapshot, top, timestamp

    def _walk(self, known: dict[str, tuple[int, list[AdapterSummary]]]) -> tuple | None:
        """Every bin at one snapshot, a fresh Updater after every :data:`BIN_BATCH` bins it
        loaded; ``known`` (updated in place) spares the bins already held at the snapshot's
        version. None: the snapshot changed between two batches (the caller walks again)."""
        updater, snapshot, top, timestamp = self._updater()
        succinct = top.delegations.succinct_roles if top.delegations is not None else None
        if succinct is None:
            raise VerificationError("the registry's targets delegate to no hashed bins", code="tuf_invalid")
        shards = shard_targets(succinct.bit_length, succinct.name_prefix)
        bins: dict[str, tuple[int, list[AdapterSummary]]] = {}
        loaded = 0  # bins the current updater has loaded
        for name in succinct.get_roles():
            meta = snapshot.meta.get(f"{name}.json")
            if meta is None:
                raise VerificationError(f"the snapshot does not list bin {name}", code="tuf_invalid")
            old = known.get(name)
            if old is not None and old[0] == meta.version:
                bins[name] = old
                continue
            adapters: list[AdapterSummary] = []  # a bin's first version is empty
            if meta.version > 1:
                if loaded == BIN_BATCH:  # let this updater's roles go: ngclient would keep them all
                    updater, now, _, _ = self._updater()
                    loaded = 0
                    if now.version != snapshot.version:
                        return None
                info = updater.get_targetinfo(shards[name])
                loaded += 1
                if info is not None:
                    adapters = decode_shard(self._target(updater, info, MAX_SHARD_BYTES))
            bins[name] = known[name] = (meta.version, adapters)
        info = updater.get_targetinfo(KEYS_TARGET)
        keys = {} if info is None else decode_keys(self._target(updater, info, MAX_KEYS_BYTES))
        return bins, keys, snapshot, timestamp

    def _target(self, updater: Updater, info: TargetFile, cap: int) -> bytes:
        if info.length > cap:
            raise VerificationError(f"target {info.path} is {info.length} bytes (limit {cap})", code="too_long")
        path = updater.find_cached_target(info) or updater.download_target(info)
        return Path(path).read_bytes()

    # -- the last accepted state, for serving while the registry is unreachable -----------------
    def _save(self, accepted_at: float) -> None:
        state = {"registry": self.url, "accepted_at": accepted_at, "version": self.version, "expires": self.expires,
                 "bins": {name: v for name, (v, adapters) in self.bins.items() if adapters}}
        atomic_write(self.directory / "state.json", json.dumps(state, sort_keys=True).encode())

    def load_saved(self) -> float | None:
        """Reload the last accepted library from disk (no network); its acceptance time, or None.

        Each shard is re-verified against the bin metadata ngclient kept (length and hashes).
        """
        try:
            state = json.loads((self.directory / "state.json").read_text())
            if state["registry"] != self.url:
                return None
            top = Metadata[Targets].from_bytes((self._metadata_dir / "targets.json").read_bytes()).signed
            succinct = top.delegations.succinct_roles
            shards = shard_targets(succinct.bit_length, succinct.name_prefix)
            bins: dict[str, tuple[int, list[AdapterSummary]]] = {}
            for name, version in state["bins"].items():
                role = Metadata[Targets].from_bytes((self._metadata_dir / f"{name}.json").read_bytes()).signed
                if role.version != version:
                    return None
                info = role.targets.get(shards[name])
                adapters: list[AdapterSummary] = []
                if info is not None:
                    path = self._targets_dir / _quote(info.path)
                    with open(path, "rb") as fh:
                        info.verify_length_and_hashes(fh)
                    adapters = decode_shard(path.read_bytes())
                bins[name] = (version, adapters)
            keys: dict[str, bytes] = {}
            keys_path = self._targets_dir / _quote(KEYS_TARGET)
            if keys_path.exists():
                keys = decode_keys(keys_path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, tuf_errors.RepositoryError,
                VerificationError) as exc:
            logger.warning("cannot reload the saved library of %s: %s", self.url, exc)
            return None
        self.bins, self.keys, self.changed, self._library, self.change = bins, keys, list(bins), None, None
        self.version, self.expires = state["version"], state["expires"]
        return float(state["accepted_at"])

    def library(self) -> list[AdapterSummary]:
        """Every listed adapter, by name and version (a stable order: a cold start and a refresh
        agree). The same list until a refresh changes a bin's adapters: do not modify it."""
        if self._library is None:
            self._library = sorted((a for name in self.bins for a in self.bins[name][1]), key=by_name_version)
        return self._library

    def _merged(self, gone: list[AdapterSummary], came: list[AdapterSummary]) -> list[AdapterSummary] | None:
        """The sorted library less the changed bins' old adapters (``gone``) and with their new
        ones (``came``, sorted) inserted in order (None, to sort anew, when nothing is held or much
        changed)."""
        if self._library is None or len(gone) + len(came) > len(self._library) // 4 + 64:
            return None
        return spliced_list(self._library, gone, came)[0]


def spliced_list(held: list[AdapterSummary], gone: Sequence[AdapterSummary],
                 came: Sequence[AdapterSummary]) -> tuple[list[AdapterSummary], list[int], list[int]]:
    """``held`` (sorted by :func:`by_name_version`) less the very objects of ``gone`` it holds,
    with ``came`` (sorted) inserted in order: found by bisection and copied in one pass, so the
    work grows with the change, not with the list.

    Returns:
        (the list, the positions in ``held`` of what was taken out (ascending), the position in
        ``held`` before which each of ``came`` went).
    """
    removed = []
    for a in gone:
        key = by_name_version(a)
        i = bisect.bisect_left(held, key, key=by_name_version)
        while i < len(held) and held[i] is not a and by_name_version(held[i]) == key:
            i += 1  # the same name and version listed twice: look further
        if i < len(held) and held[i] is a:
            removed.append(i)
    removed.sort()
    at = [bisect.bisect_left(held, by_name_version(a), key=by_name_version) for a in came]
    out: list[AdapterSummary] = []
    cursor = 0
    for position, a in sorted([*zip(at, came), *((r, None) for r in removed)], key=lambda e: e[0]):
        out += held[cursor:position]
        cursor = max(cursor, position)
        if a is not None:
            out.append(a)
        else:  # a removal (at the same position as an insertion, either order gives the same list)
            cursor = position + 1
    out += held[cursor:]
    return out, removed, at


@dataclasses.dataclass(frozen=True)
class LibraryChange:
    """How one refresh changed :meth:`TufIndex.library`: the list before it (which the list after
    it equals less ``gone`` plus ``came``). Every adapter of a changed bin is in both: it leaves
    as the old object and comes back as a new one."""

    before: list[AdapterSummary]
    gone: list[AdapterSummary]
    came: list[AdapterSummary]  # by name and version


def by_name_version(summary: AdapterSummary) -> tuple[str, int]:
    """The library's order (the key of :meth:`TufIndex.library`'s sort)."""
    return summary.name, summary.version


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, "")


def directory_for(cache_dir: Path, url: str) -> Path:
    """Where a node keeps one registry's TUF state (one directory per registry URL)."""
    return Path(cache_dir) / "tuf" / hashlib.sha256(url.encode()).hexdigest()[:16]

