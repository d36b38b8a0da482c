"""SemLA retrieval (DESIGN §4): nearest adapters by centroid distance, softmax weights.

The same math twice: numpy (the torch-free registry server) and torch (the node, on GPU). An
adapter's distance is the minimum over its centroids; weights are ``softmax(-d / T)`` over the
top-k. Both functions return identical results up to float rounding (tested). Temperatures are
bounded (:data:`~semla.schemas.api.MIN_TEMPERATURE` .. ``MAX_TEMPERATURE``) and queries scaled
before they are normalised, so every weight is finite.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from semla.schemas.api import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DISTANCES,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
)
from semla.schemas.errors import InvalidInputError

__all__ = [
    "DISTANCES",
    "DEFAULT_TOP_K",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_DISTANCE",
    "CentroidTable",
    "retrieve_numpy",
    "retrieve_torch",
    "list_distances",
    "temperature_ok",
    "TEMPERATURE_RANGE",
]



def list_distances() -> list[str]:
    return list(DISTANCES)


def temperature_ok(temperature: float) -> bool:
    """True for a finite temperature within [MIN_TEMPERATURE, MAX_TEMPERATURE] (NaN is not)."""
    return MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE


#: For error messages and --help.
TEMPERATURE_RANGE = f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"


def _check(distance: str, top_k: int, temperature: float) -> None:
    if distance not in DISTANCES:
        raise InvalidInputError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    if top_k < 1:
        raise InvalidInputError("top_k must be >= 1")
    if not temperature_ok(temperature):
        raise InvalidInputError(f"temperature must lie in {TEMPERATURE_RANGE}, got {temperature!r}")


@dataclasses.dataclass(frozen=True)
class CentroidTable:
    """All centroids of a library, flattened: row i belongs to adapter ``owner[i]``.

    Attributes:
        vectors: (C, D) float32 unit vectors.
        owner: (C,) int64 index into the adapter list.
        n_adapters: number of adapters.
    """

    vectors: np.ndarray
    owner: np.ndarray
    n_adapters: int
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def tensors(self, device: Any) -> tuple[Any, Any]:
        """(centroids, owner) as torch tensors on ``device``, copied there once per table."""
        import torch

        key = str(device)
        if key not in self._on_device:
            owner = None if self.one_per_adapter else torch.as_tensor(self.owner, device=device)
            self._on_device[key] = (torch.as_tensor(self.vectors, device=device), owner)
        return self._on_device[key]

    @functools.cached_property
    def one_per_adapter(self) -> bool:
        """Row i is adapter i's only centroid: the min over centroids can be skipped."""
        return len(self.owner) == self.n_adapters and bool((self.owner == np.arange(self.n_adapters)).all())

    @classmethod
    def from_lists(cls, centroids_per_adapter: Sequence[Sequence[Sequence[float]]]) -> "CentroidTable":
        rows, owner = [], []
        for i, cents in enumerate(centroids_per_adapter):
            for c in cents:
                rows.append(np.asarray(c, dtype=np.float32))
                owner.append(i)
        if not rows:
            raise InvalidInputError("the library is empty")
        vectors = np.stack(rows)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls(vectors, np.asarray(owner, dtype=np.int64), len(centroids_per_adapter))


def _softmax_neg(d: np.ndarray, temperature: float) -> np.ndarray:
    z = -d / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def retrieve_numpy(
    queries: np.ndarray,
    table: CentroidTable,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = DEFAULT_TEMPERATURE,
    distance: str = DEFAULT_DISTANCE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k adapters per query.

    Args:
        queries: (Q, D) embeddings (normalised here).

    Returns:
        (indices (Q, k) int64 adapter indices nearest first, distances (Q, k), weights (Q, k)),
        with k = min(top_k, number of adapters).
    """
    _check(distance, top_k, temperature)
    q = np.asarray(queries, dtype=np.float64)
    peak = np.abs(q).max(axis=1, keepdims=True) if q.size else q
    if not (np.isfinite(q).all() and (peak > 0).all()):
        raise InvalidInputError("every query embedding must be finite and non-zero")
    q = q / peak  # scaled first: the square sum of large finite values stays finite
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    sim = q @ table.vectors.T  # (Q, C)
    d_cent = np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None)) if distance == "euclidean" else 1.0 - sim
    if table.one_per_adapter:
        d_adapter = d_cent
    else:
        d_adapter = np.full((q.shape[0], table.n_adapters), np.inf, dtype=np.float32)
        np.minimum.at(d_adapter, (slice(None), table.owner), d_cent)
    k = min(top_k, table.n_adapters)
    if k < table.n_adapters:  # partial selection first: O(n) instead of sorting the library
        part = np.argpartition(d_adapter, k - 1, axis=1)[:, :k]
        # ties at the k-th distance: keep the lowest indices, as a stable full sort would
        kth = np.take_along_axis(d_adapter, part, axis=1).max(axis=1, keepdims=True)
        cand = [np.flatnonzero(row <= t) for row, t in zip(d_adapter, kth)]
        idx = np.stack([c[np.argsort(row[c], kind="stable")][:k] for c, row in zip(cand, d_adapter)])
    else:
        idx = np.argsort(d_adapter, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d_adapter, idx, axis=1)
    return idx, dist, _softmax_neg(dist, temperature)


def retrieve_torch(
    queries: Any,
    table: CentroidTable,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = DEFAULT_TEMPERATURE,
    distance: str = DEFAULT_DISTANCE,
    device: Any = None,
) -> tuple[Any, Any, Any]:
    """Torch twin of :func:`retrieve_numpy`; tensors on ``device`` (default: the queries')."""
    import torch

    _check(distance, top_k, temperature)
    q = torch.as_tensor(queries, dtype=torch.float32, device=device)
    if not bool(torch.isfinite(q).all()):
        raise InvalidInputError("every query embedding must be finite")
    q = torch.nn.functional.normalize(q / q.abs().amax(dim=1, keepdim=True).clamp(min=1e-30), dim=1)
    cents, owner = table.tensors(q.device)
    sim = q @ cents.T  # (Q, C)
    d_cent = torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=0.0)) if distance == "euclidean" else 1.0 - sim
    if table.one_per_adapter:
        d_adapter = d_cent
    else:
        d_adapter = torch.full((q.shape[0], table.n_adapters), float("inf"), device=q.device)
        d_adapter = d_adapter.scatter_reduce(1, owner.expand_as(d_cent), d_cent, reduce="amin")
    k = min(top_k, table.n_adapters)
    dist, idx = torch.topk(d_adapter, k, dim=1, largest=False, sorted=True)
    weights = torch.softmax(-dist / temperature, dim=1)
    return idx, dist, weights
