"""The inference node: pull the library, retrieve per image, verify, fuse exactly, segment.

Retrieval runs here, on the node (the query embedding never leaves it). Only the adapters an
image needs are downloaded, and each is verified end to end before use (publisher signature,
every file hash, safetensors header, the listing's centroids against the signed manifest, the
base fingerprint); verified bundles are cached on disk and re-verified when read back.

Python API::

    node = Node("http://127.0.0.1:8080")
    node.pull()                                   # the adapter list (+ publisher keys)
    seg = node.segmenter(["sky", "road", "car"])  # top-k 5, T 0.05, euclidean by default
    for pred in seg.segment(["street.png"]):
        pred.mask, pred.contributions
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semla.registry.bundle import atomic_replace_dir, read_bundle, verify_bundle
from semla.registry.data import read_image
from semla.registry.fusion import FusionEngine, LoraAdapter, load_adapter
from semla.registry.http import RegistryClient
from semla.registry.model import DenseClip, load_base, lora_target_modules
from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    CentroidTable,
    retrieve_torch,
)
from semla.schemas import ADAPTER_WEIGHTS_FILE, BUNDLE_FILES, MANIFEST_FILE, AdapterSummary, Manifest
from semla.schemas.errors import IncompatibleAdapterError, InvalidInputError, NotFoundError, VerificationError

logger = logging.getLogger(__name__)

__all__ = ["Node", "Segmenter", "Prediction", "Contribution", "default_cache_dir", "resolve_device"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "semla" / "adapters"


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks cuda when available.

    Raises:
        InvalidInputError: an unknown device, or cuda without a GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device cuda requested but no CUDA GPU is available")
    return dev


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

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "classes": self.classes,
            "contributions": [dataclasses.asdict(c) for c in self.contributions],
        }


class Node:
    """An inference node bound to one registry and one base model.

    Args:
        registry: registry URL or a :class:`RegistryClient`.
        base: a loaded base model (default: semla-tiny on ``device``).
        cache_dir: verified adapter cache (default ``~/.cache/semla/adapters``).
    """

    def __init__(
        self,
        registry: str | RegistryClient,
        *,
        base: DenseClip | None = None,
        device: str | None = "cpu",
        cache_dir: Path | None = None,
    ) -> None:
        self.client = registry if isinstance(registry, RegistryClient) else RegistryClient(registry)
        self.device = resolve_device(device)
        self.base = (base or load_base(device=self.device)).to(self.device)
        self.engine = FusionEngine(self.base.clip, lora_target_modules(self.base.clip))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.library: list[AdapterSummary] = []
        self.trusted_keys: dict[str, bytes] = {}
        self._loaded: dict[str, LoraAdapter] = {}
        self._table: CentroidTable | None = None

    # -- library ------------------------------------------------------------------------------
    def pull(self) -> list[AdapterSummary]:
        """Fetch the adapter list and publisher keys; keep the adapters made for this base.

        Raises:
            NotFoundError: the registry holds no adapter for this node's base model.
        """
        listing = self.client.list_adapters()
        self.trusted_keys = self.client.trusted_keys()
        fingerprint = self.base.ref.fingerprint
        self.library = [a for a in listing if a.base_fingerprint == fingerprint]
        if not self.library:
            raise NotFoundError(
                f"the registry lists {len(listing)} adapter(s), none for base {self.base.ref.arch} "
                f"({fingerprint[:12]})"
            )
        self._table = CentroidTable.from_lists([a.centroids for a in self.library])
        return self.library

    @staticmethod
    def _key(summary: AdapterSummary) -> str:
        return f"{summary.name}@{summary.version}"

    def _verify(self, summary: AdapterSummary, files: dict[str, bytes]) -> Manifest:
        manifest = verify_bundle(files, self.trusted_keys)
        if hashlib.sha256(files[MANIFEST_FILE]).hexdigest() != summary.manifest_sha256:
            raise VerificationError(f"{self._key(summary)}: manifest differs from the one the registry listed")
        if (manifest.name, manifest.version, manifest.publisher) != (summary.name, summary.version, summary.publisher):
            raise VerificationError(f"{self._key(summary)}: signed name/version/publisher differ from the listing")
        if manifest.centroids.embedding_model != self.base.embedding_model:
            raise IncompatibleAdapterError(
                f"{self._key(summary)}: centroids live in {manifest.centroids.embedding_model}, "
                f"this node retrieves in {self.base.embedding_model}"
            )
        listed = np.asarray(summary.centroids, dtype=np.float64)
        signed = np.asarray(manifest.centroids.vectors, dtype=np.float64)
        if listed.shape != signed.shape or not np.allclose(listed, signed, atol=1e-6):
            raise VerificationError(f"{self._key(summary)}: listed centroids differ from the signed manifest")
        return manifest

    def _read_cache(self, summary: AdapterSummary, path: Path) -> tuple[dict[str, bytes], Manifest] | None:
        """A cached bundle, re-verified (re-hashed) on every load; None when absent or bad."""
        if not path.is_dir():
            return None
        try:
            files = read_bundle(path)
            return files, self._verify(summary, files)
        except VerificationError as exc:
            logger.warning("cached %s failed verification (%s); fetching it again", path, exc)
            return None

    def adapter(self, summary: AdapterSummary) -> LoraAdapter:
        """The verified, loaded adapter for a library entry (downloaded once, then cached)."""
        key = self._key(summary)
        if key in self._loaded:
            return self._loaded[key]
        cached = self.cache_dir / summary.name / f"{summary.version}-{summary.manifest_sha256[:16]}"
        found = self._read_cache(summary, cached)
        if found is None:
            files = {f: self.client.fetch_file(summary.name, summary.version, f) for f in BUNDLE_FILES}
            manifest = self._verify(summary, files)
            atomic_replace_dir(cached, files, overwrite=True)
        else:
            files, manifest = found
        adapter = load_adapter(key, files[ADAPTER_WEIGHTS_FILE], manifest, self.base.ref.fingerprint,
                               self.engine.targets, device=self.device)
        self._loaded[key] = adapter
        return adapter

    def segmenter(
        self,
        classes: Sequence[str],
        *,
        top_k: int = DEFAULT_TOP_K,
        temperature: float = DEFAULT_TEMPERATURE,
        distance: str = DEFAULT_DISTANCE,
    ) -> "Segmenter":
        if not self.library:
            self.pull()
        return Segmenter(self, classes, top_k=top_k, temperature=temperature, distance=distance)


class Segmenter:
    """Segments images with a fixed vocabulary, fusing each image's own top-k adapters."""

    def __init__(self, node: Node, classes: Sequence[str], *, top_k: int, temperature: float, distance: str) -> None:
        classes = [c.strip() for c in classes if c.strip()]
        if not classes:
            raise InvalidInputError("the class list is empty")
        if top_k < 1 or not temperature > 0:
            raise InvalidInputError("top-k must be >= 1 and temperature > 0")
        self.node = node
        self.classes = classes
        self.top_k, self.temperature, self.distance = top_k, temperature, distance
        with torch.no_grad():
            self.text = node.base.encode_classes(classes)

    @torch.no_grad()
    def _masks(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        logits = self.node.base.dense_logits(pixels, self.text)  # (B, C, g, g)
        return [
            F.interpolate(logits[i : i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
            .to(torch.uint8).cpu().numpy()
            for i, size in enumerate(sizes)
        ]

    @torch.no_grad()
    def segment(
        self,
        images: Sequence[str | Path | np.ndarray],
        *,
        with_base: bool = False,
        adapter: str | None = None,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Segment images (paths or uint8 (H, W, 3) arrays), batch by batch.

        Args:
            with_base: also fill each prediction's ``base_mask`` (the base model alone).
            adapter: pin one adapter by name (weight 1) instead of retrieving per image.
        """
        pinned = None
        if adapter is not None:
            names = [a.name for a in self.node.library]
            if adapter not in names:
                raise NotFoundError(f"adapter {adapter!r} is not in the library; have: {', '.join(names)}")
            pinned = names.index(adapter)
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            out.extend(self._segment_batch(images[start : start + batch_size], with_base, pinned))
        return out

    def _segment_batch(
        self, images: Sequence[str | Path | np.ndarray], with_base: bool, pinned: int | None
    ) -> list[Prediction]:
        node = self.node
        arrays = [read_image(Path(i)) if isinstance(i, (str, Path)) else np.asarray(i, dtype=np.uint8) for i in images]
        labels = [str(i) if isinstance(i, (str, Path)) else f"image-{n}" for n, i in enumerate(images)]
        sizes = [a.shape[:2] for a in arrays]
        pixels = node.base.pixels(arrays)
        node.engine.clear()
        query = node.base.embed(pixels)  # frozen base embedding: the retrieval key
        base_masks = self._masks(pixels, sizes) if with_base else [None] * len(arrays)
        table = node._table
        if pinned is None:
            idx, dist, weights = retrieve_torch(query, table, top_k=self.top_k, temperature=self.temperature,
                                                distance=self.distance)
        else:  # one adapter at weight 1; its distance still reported
            all_idx, all_dist, _ = retrieve_torch(query, table, top_k=table.n_adapters, distance=self.distance)
            pos = (all_idx == pinned).int().argmax(1, keepdim=True)
            idx, dist = all_idx.gather(1, pos), all_dist.gather(1, pos)
            weights = torch.ones_like(dist)
        needed = sorted(set(idx.flatten().tolist()))
        column = {lib_i: c for c, lib_i in enumerate(needed)}
        adapters = [node.adapter(node.library[i]) for i in needed]
        cols = torch.tensor([column[i] for i in idx.flatten().tolist()], device=node.device).view_as(idx)
        mix = torch.zeros(len(arrays), len(needed), device=node.device).scatter_(1, cols, weights)  # (B, n)
        node.engine.set_mixture(adapters, mix)
        try:
            masks = self._masks(pixels, sizes)
        finally:
            node.engine.clear()
        preds = []
        for b in range(len(arrays)):
            contribs = [
                Contribution(
                    name=node.library[int(i)].name, version=node.library[int(i)].version,
                    publisher=node.library[int(i)].publisher, distance=float(d), weight=float(w),
                )
                for i, d, w in zip(idx[b].tolist(), dist[b].tolist(), weights[b].tolist())
            ]
            preds.append(Prediction(labels[b], self.classes, masks[b], contribs, base_masks[b]))
        return preds
