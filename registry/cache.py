"""The node's verified adapter cache: device memory, host memory, disk (DESIGN §5, §6).

An adapter enters any tier only after full verification (the loader verifies); disk entries
are re-verified (re-hashed) every time they are read back. Each tier has a byte budget that it
never exceeds; least recently used entries are evicted first, except those a batch needs right
now. Adapters that leave the library (revoked) are dropped from every tier by :meth:`retain`.
On a CPU node the device tier *is* host memory, so only the host budget applies.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from semla.registry.bundle import read_bundle
from semla.registry.fs import atomic_replace_dir
from semla.registry.fusion import LoraAdapter
from semla.schemas import AdapterSummary
from semla.schemas.errors import InvalidInputError

__all__ = ["CacheLimits", "AdapterCache", "adapter_key", "STAT_KEYS"]

GiB = 1024**3
#: Every counter of :attr:`AdapterCache.stats`, present from the start (at zero), so a reader on
#: another thread (the metrics scrape) iterates a dict whose size never changes.
STAT_KEYS = ("device_hits", "device_misses", "device_evictions", "host_hits", "host_misses", "host_evictions",
             "disk_hits", "disk_rejected", "disk_evictions", "downloads")


def adapter_key(summary: AdapterSummary) -> str:
    return f"{summary.name}@{summary.version}"


@dataclasses.dataclass(frozen=True)
class CacheLimits:
    """Byte budgets per tier."""

    device_bytes: int = 2 * GiB
    host_bytes: int = 4 * GiB
    disk_bytes: int = 20 * GiB

    def __post_init__(self) -> None:
        if min(self.device_bytes, self.host_bytes, self.disk_bytes) <= 0:
            raise InvalidInputError("cache limits must be positive byte counts")


def _nbytes(adapter: LoraAdapter) -> int:
    return sum(t.numel() * t.element_size() for d in (adapter.A, adapter.B) for t in d.values())


def _to(adapter: LoraAdapter, device: torch.device) -> LoraAdapter:
    move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
    return dataclasses.replace(adapter, A=move(adapter.A), B=move(adapter.B))


class _Tier:
    """An LRU of loaded adapters within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self.sizes: dict[str, int] = {}
        self.used = 0  # bytes, kept up to date by put/drop (read by the metrics scrape)

    def get(self, key: str) -> LoraAdapter | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: str, adapter: LoraAdapter, keep: set[str]) -> list[str]:
        """Insert, evicting LRU entries outside ``keep``; returns evicted keys."""
        size = _nbytes(adapter)
        self.drop(key)
        evicted = []
        for old in list(self.entries):
            if self.used + size <= self.budget:
                break
            if old not in keep:
                self.drop(old)
                evicted.append(old)
        if self.used + size > self.budget:
            raise InvalidInputError(
                f"adapter cache budget of {self.budget} bytes cannot hold the {len(keep)} adapter(s) one batch "
                "needs; raise the limit or lower top-k / the batch size"
            )
        self.entries[key] = adapter
        self.sizes[key] = size
        self.used += size
        return evicted

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)
        self.used -= self.sizes.pop(key, 0)


class Source(Protocol):
    """Where adapters come from (:class:`~semla.registry.source.BundleSource` on a node)."""

    def fetch(self, summary: AdapterSummary) -> dict[str, bytes]:
        """Download a bundle (file name → bytes)."""

    def load(self, summary: AdapterSummary, files: dict[str, bytes]) -> LoraAdapter:
        """Verify a bundle and load it as a CPU adapter (raises if bad)."""


class AdapterCache:
    """Three-tier cache of verified adapters.

    Args:
        root: disk tier directory.
        device: where fused adapters must live.
        source: fetches bundles and verifies and loads them; the cache writes a bundle to disk
            (atomically) only after the source verified it, and re-verifies it on every read back.
    """

    def __init__(
        self,
        root: Path,
        device: torch.device,
        limits: CacheLimits,
        *,
        source: Source,
    ) -> None:
        self.root = Path(root)
        self.device = device
        self.limits = limits
        self.source = source
        self.host = _Tier(limits.host_bytes)
        self.gpu = _Tier(limits.device_bytes) if device.type != "cpu" else None
        self.stats = collections.Counter(dict.fromkeys(STAT_KEYS, 0))
        self.disk_bytes = self.disk_used()  # as of the last change this cache made on disk

    def _disk_path(self, summary: AdapterSummary) -> Path:
        return self.root / summary.name / f"{summary.version}-{summary.manifest_sha256[:16]}"

    def disk_used(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _load_host(self, summary: AdapterSummary, keep: set[str]) -> LoraAdapter:
        key = adapter_key(summary)
        adapter = self.host.get(key)
        if adapter is not None:
            self.stats["host_hits"] += 1
            return adapter
        self.stats["host_misses"] += 1
        path = self._disk_path(summary)
        adapter = None
        if path.is_dir():
            try:
                adapter = self.source.load(summary, read_bundle(path))  # re-verified on every read
                self.stats["disk_hits"] += 1
                path.touch()
            except Exception:  # a damaged or tampered disk entry is dropped and fetched again
                self.stats["disk_rejected"] += 1
                shutil.rmtree(path, ignore_errors=True)
                adapter = None
        if adapter is None:
            files = self.source.fetch(summary)
            adapter = self.source.load(summary, files)  # verified before it touches the disk
            self.stats["downloads"] += 1
            atomic_replace_dir(path, files, overwrite=True)
            self._trim_disk(keep_path=path)
        self.stats["host_evictions"] += len(self.host.put(key, adapter, keep))
        return adapter

    def get_many(self, summaries: Sequence[AdapterSummary]) -> list[LoraAdapter]:
        """The verified adapters one batch needs, all resident on the device at once."""
        keep = {adapter_key(s) for s in summaries}
        out = []
        for summary in summaries:
            key = adapter_key(summary)
            if self.gpu is None:
                out.append(self._load_host(summary, keep))
                continue
            adapter = self.gpu.get(key)
            if adapter is None:
                self.stats["device_misses"] += 1
                adapter = _to(self._load_host(summary, keep), self.device)
                self.stats["device_evictions"] += len(self.gpu.put(key, adapter, keep))
            else:
                self.stats["device_hits"] += 1
            out.append(adapter)
        return out

    def _trim_disk(self, keep_path: Path) -> None:
        entries = sorted((p for p in self.root.glob("*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        used = self.disk_used()
        for path in entries:
            if used <= self.limits.disk_bytes:
                break
            if path == keep_path:
                continue
            used -= sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            self.stats["disk_evictions"] += 1
        self.disk_bytes = used

    def retain(self, library: Iterable[AdapterSummary]) -> list[str]:
        """Drop every cached adapter that is no longer in ``library`` (e.g. revoked).

        One dict over the library, then a lookup per cached adapter: a path is built only for
        what is on disk, not for every listed adapter (seconds at a million).
        """
        valid = {adapter_key(s): s for s in library}
        dropped = set()
        for tier in (self.host, self.gpu):
            if tier is None:
                continue
            for key in [k for k in tier.entries if k not in valid]:
                tier.drop(key)
                dropped.add(key)
        if self.root.is_dir():
            for path in self.root.glob("*/*"):
                listed = valid.get(f"{path.parent.name}@{path.name.split('-')[0]}")
                if path.is_dir() and (listed is None or self._disk_path(listed) != path):
                    shutil.rmtree(path, ignore_errors=True)
                    dropped.add(f"{path.parent.name}@{path.name.split('-')[0]}")
        self.disk_bytes = self.disk_used()
        return sorted(dropped)

    def forget(self, keys: Iterable[str]) -> list[str]:
        """Drop the cached adapters with these keys (``name@version``) from every tier: what
        :meth:`retain` drops when a library change took them away, found without a pass over the
        library (names are schema-checked, so the key makes a safe path)."""
        dropped = set()
        for key in keys:
            for tier in (self.host, self.gpu):
                if tier is not None and key in tier.entries:
                    tier.drop(key)
                    dropped.add(key)
            name, _, version = key.rpartition("@")
            for path in (self.root / name).glob(f"{version}-*"):  # nothing when the folder is absent
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    dropped.add(key)
        if dropped:
            self.disk_bytes = self.disk_used()
        return sorted(dropped)

    def usage(self) -> dict[str, int]:
        return {
            "device_bytes": self.gpu.used if self.gpu is not None else self.host.used,
            "host_bytes": self.host.used,
            "disk_bytes": self.disk_used(),
            "device_entries": len(self.gpu.entries) if self.gpu is not None else len(self.host.entries),
            "host_entries": len(self.host.entries),
        }
