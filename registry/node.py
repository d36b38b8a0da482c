"""The inference node: pull the library, retrieve per image, verify, fuse exactly, segment.

Retrieval runs here, on the node (the query embedding never leaves it). Only the adapters an
image needs are downloaded, and each is verified end to end before use (publisher signature,
every file hash, safetensors header, the listing's centroids against the signed manifest, and
the base card: fingerprint, embedding space, shapes and effect bounds), then kept in a
three-tier verified cache (:mod:`semla.registry.cache`). When the registry is unreachable the node keeps serving from
its cache and the last index it accepted, until that index is older than ``max_index_age``.
An adapter the node cannot use is left out (``excluded`` in :meth:`Node.health`) and the image
is retrieved again without it: one bad adapter never fails the others.

Fusion picks its path per batch: when every image shares one weight vector (a pinned adapter,
a batch of one domain) the fused weights are merged into the base for that batch; otherwise
each image gets its own low-rank mixture in the same batch. (The base is restored before
every retrieval embedding, which must come from the frozen base.)

Python API::

    node = Node("http://127.0.0.1:8080")
    node.pull()                                   # the adapter list (+ publisher keys)
    seg = node.segmenter(["sky", "road", "car"])  # top-k 5, calibrated weights, euclidean by default
    seg = node.segmenter(["sky", "road"], weighting="paper", guard=True)  # any scheme; the base's share
    for pred in seg.segment(["street.png"]):
        pred.mask, pred.contributions
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semla.registry.basecard import compute_base_card
from semla.registry.cache import AdapterCache, CacheLimits, adapter_key
from semla.registry._limits import MAX_UPSAMPLE_ELEMENTS, check_classes
from semla.registry.data import read_image
from semla.registry.device import resolve_device  # re-exported for callers of semla.registry.node
from semla.registry.fusion import FusionEngine, LoraAdapter
from semla.registry.http import RegistryClient
from semla.registry.source import BundleSource
from semla.registry.tufindex import LibraryChange, TufIndex, directory_for, spliced_list
from semla.registry.model import DenseClip, load_base, lora_target_modules
from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_WEIGHTING,
    TEMPERATURE_RANGE,
    CentroidTable,
    retrieve_torch,
    temperature_ok,
)
from semla.registry.weighting import check_guard_z, check_weighting
from semla.schemas import (
    AdapterSummary,
    Contribution,
)
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import (
    IndexExpiredError,
    IncompatibleAdapterError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
    VerificationError,
)

logger = logging.getLogger(__name__)

__all__ = ["Node", "Segmenter", "Prediction", "Contribution", "default_cache_dir", "resolve_device"]


def _table(library: Sequence[AdapterSummary]) -> CentroidTable | None:
    """The centroid table of a library, with each adapter's listed spread (None for schema 1)."""
    if not library:
        return None
    return CentroidTable.from_lists([a.centroids for a in library], [a.spread for a in library])


def _check_settings(top_k: int, temperature: float | None, weighting: str, guard_z: float | None) -> None:
    """Raises InvalidInputError for a bad top-k, temperature, weighting name or guard_z."""
    if top_k < 1 or not temperature_ok(temperature):
        raise InvalidInputError(f"top-k must be >= 1 and temperature within {TEMPERATURE_RANGE}")
    check_weighting(weighting)
    check_guard_z(guard_z)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "semla" / "adapters"


@dataclasses.dataclass
class Prediction:
    """One image's segmentation and the adapters that made it.

    Attributes:
        mask: uint8 (H, W) class indices into ``classes``, at the image's own size.
        base_mask: the same from the base model alone, when asked for.
    """

    image: str
    classes: list[str]
    mask: np.ndarray
    contributions: list[Contribution]
    base_mask: np.ndarray | None = None

    @property
    def base_weight(self) -> float:
        """The base model's share (the guard's zero adapter): 1 - the adapters' weights; 0
        without the guard, 1 when no adapter contributed."""
        return max(0.0, min(1.0, 1.0 - sum(c.weight for c in self.contributions)))

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "classes": self.classes,
            "contributions": [c.model_dump() for c in self.contributions],
            "base_weight": round(self.base_weight, 6),
        }


@dataclasses.dataclass
class Retrieval:
    """Per image: library indices (B, k), distances (B, k) and fusion weights (B, k)."""

    idx: torch.Tensor
    dist: torch.Tensor
    weights: torch.Tensor


class Node:
    """An inference node bound to one registry and one base model.

    Args:
        registry: registry URL or a :class:`RegistryClient`.
        base: a loaded base model (default: semla-tiny on ``device``).
        cache_dir: verified adapter cache and last accepted index (default ``~/.cache/semla/adapters``).
        limits: byte budgets of the cache tiers.
        max_index_age: seconds the node keeps serving from its last index while the registry
            is unreachable; after that (or after the snapshot's signed expiry) it refuses.
        registry_key: the registry key a node pinned before TUF (given, or its pin file in
            ``cache_dir``): the registry's first TUF root must carry its signature (migration).
        root: a TUF root.json of the registry given out of band (default: the first root
            signed by ``registry_key``, else trusted on first use); then ngclient keeps it current.
        card: the base card adapters are checked against before loading (default: computed from
            ``base``, with the default bounds).
    """

    def __init__(
        self,
        registry: str | RegistryClient,
        *,
        base: DenseClip | None = None,
        device: str | None = "cpu",
        cache_dir: Path | None = None,
        limits: CacheLimits = CacheLimits(),
        max_index_age: float = 86400.0,
        registry_key: bytes | None = None,
        root: bytes | None = None,
        card: BaseCard | None = None,
    ) -> None:
        self.client = registry if isinstance(registry, RegistryClient) else RegistryClient(registry)
        self.device = resolve_device(device)
        self.base = (base or load_base(device=self.device)).to(self.device)
        self.card = card if card is not None else compute_base_card(self.base)
        if self.card.fingerprint != self.base.ref.fingerprint:
            raise InvalidInputError(f"the base card is for {self.card.fingerprint[:16]}, the base is "
                                    f"{self.base.ref.fingerprint[:16]}")
        self.engine = FusionEngine(self.base.clip, lora_target_modules(self.base.clip))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.source = BundleSource(self.client, self.card, self.base.ref.fingerprint, self.engine.targets)
        self.cache = AdapterCache(self.cache_dir / "bundles", self.device, limits, source=self.source)
        self.max_index_age = max_index_age
        self.library: list[AdapterSummary] = []
        self.index_time: float | None = None
        self.index_expires: float | None = None
        self.index_version: int | None = None
        self.registry_key = registry_key
        self.root = root
        self._index: TufIndex | None = None
        self.offline = False
        self._table: CentroidTable | None = None
        #: The index's library list the current library was taken from (the same list: no change).
        self._listed_from: list[AdapterSummary] | None = None
        self._texts: dict[tuple[str, ...], torch.Tensor] = {}
        #: adapter key → why this node cannot use it (left out of retrieval; shown in health()).
        self.excluded: dict[str, str] = {}

    # -- library ------------------------------------------------------------------------------
    def pull(self) -> list[AdapterSummary]:
        """Update the library through the registry's TUF metadata; keep the adapters of this base.

        ``tuf.ngclient`` verifies root, timestamp, snapshot, the top-level targets and every bin
        it reads (thresholds, rollback, freeze, mix-and-match, lengths and hashes); only the bins
        and centroid shards that changed since the last refresh are downloaded. The first root is
        the one given (``root``), or the registry's ``1.root.json`` signed by the registry key this
        node pinned before TUF (the migration), or trusted on first use. When the registry cannot
        be reached, the last accepted library is served again until it expires.

        Raises:
            VerificationError: metadata or a shard refused (``rollback``, ``index_expired``,
                ``hash_mismatch``, ``too_long``, ``tuf_signature``, ...); nothing is replaced.
            RegistryError: unreachable and no usable library on disk, or refused.
            NotFoundError: the library holds no adapter for this node's base model.
        """
        index = self._tuf_index()
        try:
            index.refresh()
            accepted_at = time.time()
            self.offline = False
        except RegistryError as exc:
            unreachable = exc.code == "unreachable" or (exc.status is not None and exc.status >= 500)
            if not unreachable:
                raise
            accepted_at = self.index_time if index.version is not None else index.load_saved()
            if accepted_at is None:
                raise RegistryError(f"{exc.message}; and no earlier index of this registry is cached",
                                    code="unreachable") from None
            self.offline = True
            logger.warning("registry unreachable (%s); serving from the index accepted at %s", exc.message,
                           time.ctime(accepted_at))
        everything = index.library()
        # Everything is computed first and swapped in together: a pull replaces the library, its
        # centroid table, the keys and the index metadata as one, or (on any error) nothing.
        change, applied = index.change, None
        if everything is self._listed_from and self._table is not None:
            # No bin's adapters changed since the last pull (the index hands back the same list):
            # the library, its table and what was left out stand; the keys and times move on.
            applied = self.library, self._table, self.excluded, set()
        elif change is not None and change.before is self._listed_from and self._table is not None:
            applied = self._applied(change)  # the usual refresh: a few bins changed since
        if applied is not None:
            library, table, excluded, left = applied
            tidy = functools.partial(self.cache.forget, left) if left else None
        else:
            library, table, excluded, changed = self._listed(everything)
            tidy = functools.partial(self.cache.retain, library) if changed else None
        self.library, self._table, self.source.trusted_keys, self.excluded = library, table, dict(index.keys), excluded
        self.index_time, self.index_expires, self.index_version = accepted_at, index.expires, index.version
        self._listed_from = everything
        if tidy is not None and not self.offline:
            dropped = tidy()  # revoked adapters leave every tier
            if dropped:
                logger.info("dropped %d adapter(s) no longer in the library: %s", len(dropped), ", ".join(dropped))
        return self.library

    def _listed(self, everything: list[AdapterSummary]) -> tuple[list[AdapterSummary], CentroidTable | None, dict[str, str], bool]:
        """The library of this base in ``everything``, its centroid table, what is left out, and
        whether the table changed: a pass over the whole list (the first pull, or one that
        cannot follow the index's change).

        The index keeps the summaries of the bins that did not change (the same objects), so what
        this node already holds is known by identity: only what is new is checked, and the table
        is spliced when little changed. (self.library keeps its summaries alive, so their ids
        cannot be reused by new ones.)

        Raises:
            NotFoundError: no adapter of this base is listed.
        """
        fingerprint = self.base.ref.fingerprint
        listed = [a for a in everything if a.base_fingerprint == fingerprint]
        if not listed:
            raise NotFoundError(
                f"the registry lists {len(everything)} adapter(s), none for base {self.base.ref.arch} "
                f"({fingerprint[:12]})"
            )
        held = {id(a): i for i, a in enumerate(self.library)}
        excluded = {}
        if self.excluded:
            listed_keys = {adapter_key(a) for a in listed}
            excluded = {k: why for k, why in self.excluded.items() if k in listed_keys}
        for a in listed:
            if id(a) in held:
                continue  # checked when it came
            why = self._unusable_listing(a)
            if why is not None and adapter_key(a) not in excluded:
                logger.warning("leaving out %s: %s", adapter_key(a), why)
                excluded[adapter_key(a)] = why
        library = [a for a in listed if adapter_key(a) not in excluded] if excluded else listed
        table, changed = self._table_of(library, held)
        return library, table, excluded, changed

    def _table_of(self, library: list[AdapterSummary], held: dict[int, int]) -> tuple[CentroidTable | None, bool]:
        """The centroid table of ``library`` and whether it differs from the one held: the held
        table itself when nothing changed, the held table spliced when a few adapters came or
        went (both lists are by name and version, so those that stay keep their order), else a
        table built anew. ``held``: id of each summary of ``self.library`` → its position."""
        old = self._table
        if old is None or not library or not held:
            return _table(library), True
        pos = np.fromiter((held.get(id(a), -1) for a in library), dtype=np.int64, count=len(library))
        new = np.flatnonzero(pos < 0)
        stay = pos[pos >= 0]
        if not len(new) and len(stay) == len(self.library):
            return old, False
        if len(new) > len(library) // 4 + 64 or (np.diff(stay) <= 0).any():
            return _table(library), True
        keep = np.zeros(len(self.library), dtype=bool)
        keep[stay] = True
        at = new - np.arange(len(new))  # the adapters that stay before each new one
        return old.spliced(keep, at, _table([library[i] for i in new.tolist()]))[0], True

    def _applied(self, change: LibraryChange) -> tuple[list[AdapterSummary], CentroidTable, dict[str, str], set[str]] | None:
        """The library, its centroid table and what is left out after ``change`` (of the list the
        held library was taken from), and the keys no longer listed; or None (nothing of this
        base would be left: the caller's full pass says so). Work in the size of the change, not
        of the library: the changed adapters are found by bisection (the library is sorted by
        name and version), the new ones checked, the list and the table spliced once."""
        fingerprint, old = self.base.ref.fingerprint, self.library
        gone = [a for a in change.gone if a.base_fingerprint == fingerprint]
        came = [a for a in change.came if a.base_fingerprint == fingerprint]
        left = {adapter_key(a) for a in gone} - {adapter_key(a) for a in came}
        excluded = {k: why for k, why in self.excluded.items() if k not in left}
        added = []
        for a in came:
            key = adapter_key(a)
            if key in excluded:  # left out before, and listed still
                continue
            why = self._unusable_listing(a)
            if why is None:
                added.append(a)
            else:
                logger.warning("leaving out %s: %s", key, why)
                excluded[key] = why
        library, removed, at_old = spliced_list(old, gone, added)
        if not removed and not added:
            return old, self._table, excluded, left
        if not library:
            return None
        keep = np.ones(len(old), dtype=bool)
        keep[removed] = False
        at = np.asarray(at_old, dtype=np.int64) - np.searchsorted(np.asarray(removed, dtype=np.int64), at_old)
        return library, self._table.spliced(keep, at, _table(added))[0], excluded, left

    def _tuf_index(self) -> TufIndex:
        if self._index is None:
            self._index = TufIndex(self.client.http, self.client.url, directory_for(self.cache_dir, self.client.url),
                                   root=self.root, legacy_key=self._legacy_key())
        return self._index

    def _unusable_listing(self, summary: AdapterSummary) -> str | None:
        """Why a listed adapter's centroids cannot be retrieved by this node, or None."""
        dim = self.card.embedding.dim
        vectors = summary.centroids
        if not vectors or any(len(v) != dim for v in vectors):
            return f"its centroids are not {dim}-dimensional (the embedding {self.card.embedding.name})"
        arr = np.asarray(vectors, dtype=np.float64)
        if not np.isfinite(arr).all() or not (np.abs(np.linalg.norm(arr, axis=1) - 1.0) < 1e-3).all():
            return "its centroids are not finite unit vectors"
        return None

    def _exclude(self, key: str, reason: str) -> None:
        """Leave one adapter out from now on: the library and its centroid table (spliced) change together."""
        logger.warning("leaving out %s: %s", key, reason)
        keep = np.asarray([adapter_key(a) != key for a in self.library], dtype=bool)
        library = [a for a, k in zip(self.library, keep.tolist()) if k]
        if library and self._table is not None:
            table = self._table.spliced(keep, np.zeros(0, dtype=np.int64), None)[0]
        else:
            table = _table(library)
        self.library, self._table = library, table
        self.excluded = {**self.excluded, key: reason}

    def _leave_out_failed(self) -> bool:
        """Move adapters that failed to load into ``excluded``; True when the library changed."""
        failed, self.source.failed = self.source.failed, {}
        changed = False
        in_library = {adapter_key(a) for a in self.library}
        for key, reason in failed.items():
            if key in in_library:
                self._exclude(key, reason)
                changed = True
        return changed

    def _pin_path(self) -> Path:
        url_id = hashlib.sha256(self.client.url.encode()).hexdigest()[:16]  # one pin per registry URL
        return self.cache_dir / "registry-keys" / f"{url_id}.pub"

    def _legacy_key(self) -> bytes | None:
        """The registry key pinned before TUF (given, or the pin file of an older release), or None.

        A pin file that cannot be read or does not hold a key is an error (else whoever damaged
        it would choose the root).

        Raises:
            VerificationError: ``pin_unreadable``: the pin file exists but is unreadable or corrupt.
        """
        if self.registry_key is not None:
            return self.registry_key
        path = self._pin_path()
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise VerificationError(f"cannot read the pinned registry key {path}: {exc}; restore it or remove "
                                    "it to trust the registry's root again", code="pin_unreadable") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise VerificationError(f"the pinned registry key {path} is corrupt (not 32 bytes of hex); restore it "
                                    "or remove it to trust the registry's root again", code="pin_unreadable")
        return key

    def index_age(self) -> float | None:
        return None if self.index_time is None else time.time() - self.index_time

    def _expired(self) -> bool:
        age = self.index_age()
        if age is None:
            return False
        return age > self.max_index_age or (self.index_expires is not None and time.time() > self.index_expires)

    def health(self) -> dict:
        """What a health endpoint reports: ok, offline (serving from cache) or expired."""
        age = self.index_age()
        expired = self._expired()
        status = "no_index" if age is None else "expired" if expired else "offline" if self.offline else "ok"
        return {"status": status, "registry": self.client.url, "offline": self.offline,
                "index_age_s": None if age is None else round(age, 1), "max_index_age_s": self.max_index_age,
                "index_version": self.index_version,
                "adapters": len(self.library), "device": str(self.device), "cache": self.cache.usage(),
                "excluded": [{"adapter": k, "reason": why} for k, why in sorted(self.excluded.items())[:100]],
                "excluded_count": len(self.excluded),
                "cache_stats": dict(self.cache.stats)}

    def _check_servable(self) -> None:
        if self.index_time is None or self._expired():
            self.pull()  # online this refreshes the index; offline it reloads the saved one
        if self._expired():
            age = self.index_age()
            raise IndexExpiredError(
                f"the last accepted index is {age:.0f} s old (limit {self.max_index_age:.0f} s, signed expiry "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.index_expires or 0))}) and no newer one "
                "can be had; refusing to serve")

    # -- verification and loading -------------------------------------------------------------
    @property
    def trusted_keys(self) -> dict[str, bytes]:
        """Key id → raw public key of every publisher the accepted library lists."""
        return self.source.trusted_keys

    def verified_files(self, summary: AdapterSummary) -> dict[str, bytes]:
        """Download one listed adapter's bundle and verify it exactly as before use; its files.

        Raises:
            VerificationError, IncompatibleAdapterError: as for any adapter the node loads.
        """
        return self.source.verified_files(summary)

    def adapter(self, summary: AdapterSummary) -> LoraAdapter:
        """The verified adapter for a library entry, resident on the node's device."""
        return self.cache.get_many([summary])[0]

    # -- inference ----------------------------------------------------------------------------
    def text(self, classes: Sequence[str]) -> torch.Tensor:
        """Text embeddings of a vocabulary, cached: (C, E)."""
        key = tuple(classes)
        if key not in self._texts:
            check_classes(key)
            if len(self._texts) >= 64:
                self._texts.pop(next(iter(self._texts)))
            with torch.no_grad():
                self._texts[key] = self.base.encode_classes(list(key))
        return self._texts[key]

    @torch.no_grad()
    def embed(self, arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (B, 3, S, S), retrieval embeddings (B, D)) from the frozen base."""
        self.engine.unmerge()
        self.engine.clear()
        pixels = self.base.pixels(arrays)
        return pixels, self.base.embed(pixels)

    def retrieve(self, query: torch.Tensor, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = DEFAULT_TEMPERATURE,
                 distance: str = DEFAULT_DISTANCE, pinned: int | None = None, weighting: str = DEFAULT_WEIGHTING,
                 guard: bool = False, guard_z: float | None = None) -> Retrieval:
        """Top-k adapters per image and their weights under ``weighting`` (with ``guard``, the
        weights sum to 1 - the base's share); with ``pinned``, that one library entry at weight 1."""
        self._check_servable()
        table = self._table
        if table is None:  # every listed adapter was left out: the base alone
            empty = torch.zeros(len(query), 0, device=query.device)
            return Retrieval(empty.long(), empty, empty)
        try:
            if pinned is None:
                return Retrieval(*retrieve_torch(query, table, top_k=top_k, temperature=temperature, distance=distance,
                                                 weighting=weighting, guard=guard, guard_z=guard_z))
            idx, dist, _ = retrieve_torch(query, table, top_k=table.n_adapters, distance=distance)
        except InvalidInputError:
            raise  # our own refusal (also a ValueError) keeps its message and code
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        pos = (idx == pinned).int().argmax(1, keepdim=True)
        dist = dist.gather(1, pos)
        return Retrieval(idx.gather(1, pos), dist, torch.ones_like(dist))

    def weigh(self, dist: torch.Tensor, idx: torch.Tensor, *, temperature: float | None = DEFAULT_TEMPERATURE,
              distance: str = DEFAULT_DISTANCE, weighting: str = DEFAULT_WEIGHTING, guard: bool = False,
              guard_z: float | None = None) -> torch.Tensor:
        """Weights (B, k') of some retrieved library entries ``idx`` at ``dist`` under a scheme
        (as :meth:`retrieve` weighs its top-k; used to re-weigh a subset, e.g. leaving one out)."""
        from semla.registry.weighting import weights_torch

        table = self._table
        if table is None:
            return torch.zeros_like(dist)
        return weights_torch(dist, idx, table.spreads, weighting=weighting, temperature=temperature, guard=guard,
                             guard_z=guard_z, distance=distance, spread_tensors=table.spread_tensors(dist.device, distance),
                             units=table.units(distance))

    @torch.no_grad()
    def fused_dense(self, pixels: torch.Tensor, retrieval: Retrieval | None) -> torch.Tensor:
        """Dense embeddings (B, g, g, E) with each image's adapters fused (None: the base)."""
        if retrieval is None or retrieval.idx.numel() == 0:
            self.engine.unmerge()
            self.engine.clear()
            return self.base.encode_dense(pixels)
        idx = retrieval.idx
        needed = sorted(set(idx.flatten().tolist()))
        column = {lib_i: c for c, lib_i in enumerate(needed)}
        adapters = self.cache.get_many([self.library[i] for i in needed])
        cols = torch.tensor([column[i] for i in idx.flatten().tolist()], device=self.device).view_as(idx)
        mix = torch.zeros(len(idx), len(needed), device=self.device).scatter_(1, cols, retrieval.weights)  # (B, n)
        if bool((mix == mix[:1]).all()):  # one weight vector for the whole batch: merged path
            self.engine.clear()
            self.engine.merge(adapters, mix[0], key=(tuple(a.key for a in adapters), tuple(mix[0].tolist())))
            dense = self.base.encode_dense(pixels)
        else:
            self.engine.unmerge()
            self.engine.set_mixture(adapters, mix)
            try:
                dense = self.base.encode_dense(pixels)
            finally:
                self.engine.clear()
        return self._finite(pixels, dense)

    def _finite(self, pixels: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Fused output is always finite: an image whose fused embeddings are not (which the base
        card's bounds should make impossible) gets the base model's, and a warning is logged."""
        bad = ~torch.isfinite(dense).flatten(1).all(dim=1)  # (B,)
        if not bool(bad.any()):
            return dense
        logger.warning("fused output of %d image(s) was not finite; they get the base model's", int(bad.sum()))
        self.engine.unmerge()
        self.engine.clear()
        dense = dense.clone()
        dense[bad] = self.base.encode_dense(pixels[bad])
        return dense

    def logits(self, dense: torch.Tensor, texts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-image class logits (C_b, g, g) from dense embeddings and each image's vocabulary."""
        scale = self.base.clip.logit_scale.exp()
        return [scale * torch.einsum("hwe,ce->chw", dense[b], t) for b, t in enumerate(texts)]

    @staticmethod
    def masks(logits: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Class index per pixel: bilinear upsampling, then argmax over classes.

        Classes are upsampled in chunks of at most :data:`MAX_UPSAMPLE_ELEMENTS` floats, keeping a
        running maximum, so memory is bounded whatever classes x pixels (the result equals the
        argmax of the whole upsampled stack, ties to the lower class index)."""
        out = []
        for lg, (h, w) in zip(logits, sizes):
            step = max(1, MAX_UPSAMPLE_ELEMENTS // max(1, h * w))
            best = torch.full((h, w), float("-inf"), device=lg.device)
            mask = torch.zeros((h, w), dtype=torch.uint8, device=lg.device)
            for c0 in range(0, lg.shape[0], step):
                up = F.interpolate(lg[None, c0 : c0 + step], size=(h, w), mode="bilinear", align_corners=False)[0]
                value, index = up.max(dim=0)  # (h, w): first maximum within the chunk
                better = value > best  # strict: an earlier class keeps a tie
                best = torch.where(better, value, best)
                mask = torch.where(better, (index + c0).to(torch.uint8), mask)
                del up
            out.append(mask.cpu().numpy())
        return out

    def contributions(self, retrieval: Retrieval, b: int) -> list[Contribution]:
        return [
            Contribution(name=self.library[i].name, version=self.library[i].version,
                         publisher=self.library[i].publisher, distance=float(d), weight=float(w))
            for i, d, w in zip(retrieval.idx[b].tolist(), retrieval.dist[b].tolist(), retrieval.weights[b].tolist())
        ]

    @torch.no_grad()
    def segment(
        self,
        images: Sequence[str | Path | np.ndarray],
        classes: Sequence[str] | Sequence[Sequence[str]],
        *,
        top_k: int = DEFAULT_TOP_K,
        temperature: float | None = DEFAULT_TEMPERATURE,
        distance: str = DEFAULT_DISTANCE,
        with_base: bool = False,
        adapter: str | None = None,
        batch_size: int = 16,
        weighting: str = DEFAULT_WEIGHTING,
        guard: bool = False,
        guard_z: float | None = None,
    ) -> list[Prediction]:
        """Segment images (paths or uint8 (H, W, 3) arrays), batch by batch.

        Args:
            classes: one vocabulary for every image, or one per image.
            temperature: None: the weighting scheme's default.
            weighting, guard, guard_z: see :mod:`semla.registry.weighting`; with the guard each
                prediction's ``base_weight`` is the base model's share.
            with_base: also fill each prediction's ``base_mask`` (the base model alone).
            adapter: pin one adapter by name (weight 1) instead of retrieving per image.
        """
        if classes and isinstance(classes[0], str):
            classes = [list(classes)] * len(images)
        if len(classes) != len(images):
            raise InvalidInputError(f"{len(images)} images but {len(classes)} class lists")
        for vocab in classes:
            check_classes(vocab)
        _check_settings(top_k, temperature, weighting, guard_z)
        self._check_servable()
        pinned = None
        if adapter is not None:
            names = [a.name for a in self.library]
            if adapter not in names:
                raise NotFoundError(f"adapter {adapter!r} is not in the library; have: {', '.join(names)}")
            pinned = names.index(adapter)
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            arrays = [read_image(Path(i)) if isinstance(i, (str, Path)) else np.asarray(i, dtype=np.uint8)
                      for i in chunk]
            labels = [str(i) if isinstance(i, (str, Path)) else f"image-{start + n}" for n, i in enumerate(chunk)]
            vocab = [list(c) for c in classes[start : start + batch_size]]
            texts = [self.text(v) for v in vocab]
            sizes = [a.shape[:2] for a in arrays]
            pixels, query = self.embed(arrays)
            base = self.masks(self.logits(self.fused_dense(pixels, None), texts), sizes) if with_base else None
            while True:
                retrieval = self.retrieve(query, top_k=top_k, temperature=temperature, distance=distance, pinned=pinned,
                                          weighting=weighting, guard=guard, guard_z=guard_z)
                try:
                    dense = self.fused_dense(pixels, retrieval)
                    break
                except (VerificationError, IncompatibleAdapterError):
                    # an adapter this node cannot use: leave it out and retrieve again (the library
                    # shrinks each time, so this ends); other errors (network) fail the batch
                    if not self._leave_out_failed() or pinned is not None:
                        raise
            masks = self.masks(self.logits(dense, texts), sizes)
            for b in range(len(arrays)):
                out.append(Prediction(labels[b], vocab[b], masks[b], self.contributions(retrieval, b),
                                      base[b] if base is not None else None))
        return out

    def segmenter(
        self,
        classes: Sequence[str],
        *,
        top_k: int = DEFAULT_TOP_K,
        temperature: float | None = DEFAULT_TEMPERATURE,
        distance: str = DEFAULT_DISTANCE,
        weighting: str = DEFAULT_WEIGHTING,
        guard: bool = False,
        guard_z: float | None = None,
    ) -> "Segmenter":
        _check_settings(top_k, temperature, weighting, guard_z)
        if not self.library:
            self.pull()
        return Segmenter(self, classes, top_k=top_k, temperature=temperature, distance=distance,
                         weighting=weighting, guard=guard, guard_z=guard_z)


class Segmenter:
    """A node bound to one vocabulary and retrieval settings."""

    def __init__(self, node: Node, classes: Sequence[str], *, top_k: int, temperature: float | None, distance: str,
                 weighting: str = DEFAULT_WEIGHTING, guard: bool = False, guard_z: float | None = None) -> None:
        classes = [c.strip() for c in classes if c.strip()]
        check_classes(classes)
        _check_settings(top_k, temperature, weighting, guard_z)
        self.node = node
        self.classes = classes
        self.top_k, self.temperature, self.distance = top_k, temperature, distance
        self.weighting, self.guard, self.guard_z = weighting, guard, guard_z

    def segment(self, images: Sequence[str | Path | np.ndarray], *, with_base: bool = False,
                adapter: str | None = None, batch_size: int = 16) -> list[Prediction]:
        """Segment images; see :meth:`Node.segment`."""
        return self.node.segment(images, self.classes, top_k=self.top_k, temperature=self.temperature,
                                 distance=self.distance, with_base=with_base, adapter=adapter, batch_size=batch_size,
                                 weighting=self.weighting, guard=self.guard, guard_z=self.guard_z)
