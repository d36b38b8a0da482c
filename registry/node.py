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

import calendar
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
import torch.nn.functional as F

from semla.registry.basecard import compute_base_card
from semla.registry.basecheck import verify_against_card
from semla.registry.bundle import atomic_replace_dir, read_bundle, verify_bundle
from semla.registry.fs import atomic_write
from semla.registry.keys import key_id
from semla.registry.keys import verify as verify_signature
from semla.registry.cache import AdapterCache, CacheLimits, adapter_key
from semla.registry._limits import MAX_UPSAMPLE_ELEMENTS, check_classes
from semla.registry.data import read_image
from semla.registry.device import resolve_device  # re-exported for callers of semla.registry.node
from semla.registry.fusion import FusionEngine, LoraAdapter, load_adapter
from semla.registry.http import RegistryClient
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
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    INDEX_CONTEXT,
    MANIFEST_FILE,
    AdapterSummary,
    IndexSigned,
    SignedIndex,
    canonical_json,
    root_rotation_payload,
)
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import (
    IncompatibleAdapterError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
    SignatureError,
    VerificationError,
)

logger = logging.getLogger(__name__)

__all__ = ["Node", "Segmenter", "Prediction", "Contribution", "default_cache_dir", "resolve_device"]

INDEX_FILE = "index.json"


def _parse_utc(text: str) -> float:
    """``2026-01-01T00:00:00Z`` → seconds since the epoch."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


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


@dataclasses.dataclass(frozen=True)
class Contribution:
    name: str
    version: int
    publisher: str
    distance: float
    weight: float


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
            "contributions": [dataclasses.asdict(c) for c in self.contributions],
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
        registry_key: the registry's raw public key, given out of band; default: trusted on
            first use and pinned in ``cache_dir``.
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
        self.cache = AdapterCache(
            self.cache_dir / "bundles", self.device, limits, fetch=self._fetch, load=self._verify_and_load,
            store=lambda path, files: atomic_replace_dir(path, files, overwrite=True), read=read_bundle,
        )
        self.max_index_age = max_index_age
        self.library: list[AdapterSummary] = []
        self.trusted_keys: dict[str, bytes] = {}
        self.index_time: float | None = None
        self.index_expires: float | None = None
        self.index_version: int | None = None
        self.registry_key = registry_key
        self.offline = False
        self._table: CentroidTable | None = None
        self._texts: dict[tuple[str, ...], torch.Tensor] = {}
        #: adapter key → why this node cannot use it (left out of retrieval; shown in health()).
        self.excluded: dict[str, str] = {}
        self._failed: dict[str, str] = {}  # filled while loading, moved to ``excluded`` between batches

    # -- library ------------------------------------------------------------------------------
    def pull(self) -> list[AdapterSummary]:
        """Fetch and verify the registry's signed index; keep the adapters made for this base.

        The snapshot must be signed by the pinned registry key (given, or trusted on first use
        and remembered in the cache dir), not older than the last one accepted (rollback) and
        not expired (freeze). When the registry cannot be reached, the last accepted snapshot
        on disk is used again (re-verified), until it expires.

        Raises:
            VerificationError: bad signature, another registry key, rollback, expired snapshot.
            RegistryError: unreachable and no usable snapshot on disk, or refused.
            NotFoundError: the index holds no adapter for this node's base model.
        """
        saved = self._load_index()
        try:
            doc = self.client.signed_index()
            accepted_at = time.time()
            self.offline = False
        except RegistryError as exc:
            unreachable = exc.code == "unreachable" or (exc.status is not None and exc.status >= 500)
            if not unreachable or saved is None:
                if unreachable:
                    raise RegistryError(f"{exc.message}; and no earlier index of this registry is cached",
                                        code="unreachable") from None
                raise
            doc, accepted_at = saved
            self.offline = True
            logger.warning("registry unreachable (%s); serving from the index accepted at %s", exc.message,
                           time.ctime(accepted_at))
        signed = self._verify_index(doc)
        if saved is not None and not self.offline:
            last = SignedIndex.model_validate(saved[0]).signed.version
            if signed.version < last:
                raise VerificationError(f"index version {signed.version} is older than the accepted {last} "
                                        "(rollback refused)", code="rollback")
        fingerprint = self.base.ref.fingerprint
        listed = [a for a in signed.adapters if a.base_fingerprint == fingerprint]
        if not listed:
            raise NotFoundError(
                f"the registry lists {len(signed.adapters)} adapter(s), none for base {self.base.ref.arch} "
                f"({fingerprint[:12]})"
            )
        # Everything is computed first and swapped in together: a pull replaces the library, its
        # centroid table, the keys and the index metadata as one, or (on any error) nothing.
        listed_keys = {adapter_key(a) for a in listed}
        excluded = {k: why for k, why in self.excluded.items() if k in listed_keys}
        for a in listed:
            why = self._unusable_listing(a)
            if why is not None and adapter_key(a) not in excluded:
                logger.warning("leaving out %s: %s", adapter_key(a), why)
                excluded[adapter_key(a)] = why
        library = [a for a in listed if adapter_key(a) not in excluded]
        table = _table(library)
        keys = {k.key_id: bytes.fromhex(k.public_key) for k in signed.keys}
        self.library, self._table, self.trusted_keys, self.excluded = library, table, keys, excluded
        self.index_time, self.index_expires = accepted_at, _parse_utc(signed.expires)
        self.index_version = signed.version
        if not self.offline:
            doc_out = {"registry": self.client.url, "accepted_at": accepted_at, "index": doc}
            atomic_replace_dir(self.cache_dir / "index", {INDEX_FILE: canonical_json(doc_out)}, overwrite=True)
            dropped = self.cache.retain(library)  # revoked adapters leave every tier
            if dropped:
                logger.info("dropped %d adapter(s) no longer in the library: %s", len(dropped), ", ".join(dropped))
        return self.library

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
        """Leave one adapter out from now on: the library and its centroid table are rebuilt together."""
        logger.warning("leaving out %s: %s", key, reason)
        library = [a for a in self.library if adapter_key(a) != key]
        self.library, self._table = library, _table(library)
        self.excluded = {**self.excluded, key: reason}

    def _leave_out_failed(self) -> bool:
        """Move adapters that failed to load into ``excluded``; True when the library changed."""
        failed, self._failed = self._failed, {}
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

    def _pinned_key(self) -> bytes:
        """The registry key: given, or pinned on first use (kept beside the cached index).

        Only a pin file that does not exist leads to trust on first use; one that cannot be
        read or does not hold a key is an error (else whoever damaged it chooses the key).

        Raises:
            VerificationError: ``pin_unreadable``: the pin file exists but is unreadable or corrupt.
        """
        if self.registry_key is not None:
            return self.registry_key
        path = self._pin_path()
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            key = self.client.registry_key()  # trust on first use
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, key.hex().encode() + b"\n")
            self.registry_key = key
            return key
        except (OSError, UnicodeDecodeError) as exc:
            raise VerificationError(f"cannot read the pinned registry key {path}: {exc}; restore it or remove "
                                    "it to trust the registry's key again", code="pin_unreadable") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise VerificationError(f"the pinned registry key {path} is corrupt (not 32 bytes of hex); restore it "
                                    "or remove it to trust the registry's key again", code="pin_unreadable")
        self.registry_key = key
        return key

    def _verify_index(self, doc: dict) -> IndexSigned:
        try:
            index = SignedIndex.model_validate(doc)
        except ValidationError:
            raise VerificationError("the registry's index is malformed", code="index_invalid") from None
        key = self._follow_rotations(self._pinned_key(), index)
        kid = key_id(key)
        sig = next((s for s in index.signatures if s.keyid == kid), None)
        if sig is None:
            raise SignatureError(f"the index is not signed by the pinned registry key {kid}", code="registry_key")
        try:
            signature = bytes.fromhex(sig.sig)
        except ValueError:
            raise SignatureError("the index signature is not hex") from None
        verify_signature(key, signature, INDEX_CONTEXT + canonical_json(index.signed.model_dump(mode="json")),
                         what="the registry's index")
        if _parse_utc(index.signed.expires) < time.time() and not self.offline:
            raise VerificationError(f"the index expired at {index.signed.expires} (freeze refused)",
                                    code="index_expired")
        return index.signed

    def _follow_rotations(self, key: bytes, index: SignedIndex) -> bytes:
        """Walk the registry's key rotations from the pinned key, each step signed by the key
        before it; pin the last key reached (unchanged when there is nothing to follow)."""
        by_old = {r.old_key_id: r for r in index.root_rotations}
        start = key
        for _ in range(len(by_old)):
            step = by_old.get(key_id(key))
            if step is None or any(s.keyid == key_id(key) for s in index.signatures):
                break
            try:
                signature = bytes.fromhex(step.signature)
            except ValueError:
                raise SignatureError("a registry key rotation signature is not hex") from None
            verify_signature(key, signature, root_rotation_payload(step.old_key_id, step.new_public_key),
                             what=f"the registry key rotation from {step.old_key_id}")
            key = bytes.fromhex(step.new_public_key)
        if key != start:
            logger.warning("the registry key was rotated from %s to %s; following it", key_id(start), key_id(key))
            self.registry_key = key
            atomic_write(self._pin_path(), key.hex().encode() + b"\n")
        return key

    def _load_index(self) -> tuple[dict, float] | None:
        """The last accepted snapshot of this registry on disk, or None."""
        try:
            doc = json.loads((self.cache_dir / "index" / INDEX_FILE).read_text())
            if doc["registry"] != self.client.url:
                return None
            return doc["index"], float(doc["accepted_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
            raise RegistryError(
                f"the last accepted index is {age:.0f} s old (limit {self.max_index_age:.0f} s, signed expiry "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.index_expires or 0))}) and no newer one "
                "can be had; refusing to serve", code="index_expired")

    # -- verification and loading -------------------------------------------------------------
    def _fetch(self, summary: AdapterSummary) -> dict[str, bytes]:
        return {f: self.client.fetch_file(summary.name, summary.version, f) for f in BUNDLE_FILES}

    def _verify_and_load(self, summary: AdapterSummary, files: dict[str, bytes]) -> LoraAdapter:
        """Verify a bundle end to end and against the base card; an adapter that fails is left out."""
        try:
            return self._check_and_load(summary, files)
        except (VerificationError, IncompatibleAdapterError) as exc:
            self._failed[adapter_key(summary)] = f"{exc.message} [{exc.code}]"
            raise

    def _check_and_load(self, summary: AdapterSummary, files: dict[str, bytes]) -> LoraAdapter:
        key = adapter_key(summary)
        manifest = verify_bundle(files, self.trusted_keys)
        if hashlib.sha256(files[MANIFEST_FILE]).hexdigest() != summary.manifest_sha256:
            raise VerificationError(f"{key}: manifest differs from the one the registry listed")
        if (manifest.name, manifest.version, manifest.publisher) != (summary.name, summary.version, summary.publisher):
            raise VerificationError(f"{key}: signed name/version/publisher differ from the listing")
        listed = np.asarray(summary.centroids, dtype=np.float64)
        signed = np.asarray(manifest.centroids.vectors, dtype=np.float64)
        if listed.shape != signed.shape or not np.allclose(listed, signed, atol=1e-6):
            raise VerificationError(f"{key}: listed centroids differ from the signed manifest")
        signed_spread = None if manifest.spread is None else list(manifest.spread.quantiles)
        if (summary.spread is None) != (signed_spread is None) or (
                signed_spread is not None and not np.allclose(summary.spread, signed_spread, atol=1e-9)):
            raise VerificationError(f"{key}: listed spread differs from the signed manifest")
        try:
            verify_against_card(self.card, manifest, files[ADAPTER_WEIGHTS_FILE])
        except IncompatibleAdapterError as exc:
            raise IncompatibleAdapterError(f"{key}: {exc.message}", code=exc.code) from None
        return load_adapter(key, files[ADAPTER_WEIGHTS_FILE], manifest, self.base.ref.fingerprint,
                            self.engine.targets, device="cpu")

    def verified_files(self, summary: AdapterSummary) -> dict[str, bytes]:
        """Download one listed adapter's bundle and verify it exactly as before use; its files.

        Raises:
            VerificationError, IncompatibleAdapterError: as for any adapter the node loads.
        """
        files = self._fetch(summary)
        self._verify_and_load(summary, files)
        return files

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
                             guard_z=guard_z, distance=distance, spread_tensors=table.spread_tensors(dist.device, distance))

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
