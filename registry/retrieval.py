"""SemLA retrieval (DESIGN §4): nearest adapters by centroid distance, then fusion weights.

The same math twice: numpy (the torch-free registry server) and torch (the node, on GPU). An
adapter's distance is the minimum over its centroids; the top-k adapters' weights come from a
named weighting scheme (:mod:`semla.registry.weighting`: ``calibrated`` by default,
``neg-distance``, ``paper``), optionally with the guard that gives the base model (a zero
adapter) its share: then the weights sum to ``1 - base weight``. Both functions return
identical results up to float rounding (tested). Temperatures are bounded
(:data:`~semla.schemas.api.MIN_TEMPERATURE` .. ``MAX_TEMPERATURE``) and queries scaled before
they are normalised, so every weight is finite.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from semla.registry import weighting as _weighting
from semla.registry.distances import distance_from_similarity
from semla.registry.weighting import list_weightings
from semla.schemas.api import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_WEIGHTING,
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
    "DEFAULT_WEIGHTING",
    "list_weightings",
    "CentroidTable",
    "retrieve_numpy",
    "retrieve_torch",
    "similarities",
    "unit_queries",
    "weigh_numpy",
    "list_distances",
    "temperature_ok",
    "TEMPERATURE_RANGE",
]



def list_distances() -> list[str]:
    return list(DISTANCES)


def temperature_ok(temperature: float | None) -> bool:
    """True for None (the scheme's default) or a finite temperature within [MIN_TEMPERATURE,
    MAX_TEMPERATURE] (NaN is not)."""
    return temperature is None or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE


#: For error messages and --help.
TEMPERATURE_RANGE = f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"


def _check(distance: str, top_k: int, temperature: float | None, weighting: str = DEFAULT_WEIGHTING,
           guard_z: float | None = None) -> None:
    """InvalidInputError (also a ValueError) for a bad distance, top-k, temperature, weighting or guard_z."""
    _weighting.check_weighting(weighting)
    _weighting.check_guard_z(guard_z)
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
        spread: optional (A, 3) per-adapter (q50, q90, q99) of their training embeddings'
            euclidean distances to their nearest centroid (manifest schema 2); rows of NaN (or
            None for all) are version-1 adapters, which get the documented default
            (:func:`semla.registry.weighting.fill_spreads`) in :attr:`spreads`.
    """

    vectors: np.ndarray
    owner: np.ndarray
    n_adapters: int
    spread: np.ndarray | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def keep_columns(self) -> "CentroidTable":
        """Keep the vectors laid out dimension by dimension too ((D, C), contiguous): a lone
        query's product (:func:`similarities`) then takes 2/3 of the time, for twice the table's
        memory; laying them out takes about 30 ms at 100k 64-d centroids. Returns the table."""
        if "columns" not in self._cache:
            self._cache["columns"] = np.ascontiguousarray(self.vectors.T)
        return self

    @functools.cached_property
    def spreads(self) -> np.ndarray:
        """(A, 3) float64 spreads, version-1 rows filled with the library's default."""
        return _weighting.fill_spreads(self.spread, self.vectors, self.owner, self.n_adapters)

    @functools.cached_property
    def spread_known(self) -> np.ndarray:
        """(A,) bool: the adapter published its spread (False: the default stands in)."""
        if self.spread is None:
            return np.zeros(self.n_adapters, dtype=bool)
        return np.isfinite(np.asarray(self.spread, dtype=np.float64)).all(axis=1)

    def units(self, distance: str) -> "_weighting.Units":
        """What the weights need of this library's spreads in ``distance``'s units, computed once."""
        key = f"units:{distance}"
        if key not in self._cache:
            self._cache[key] = _weighting.library_units(self.spreads, distance)
        return self._cache[key]

    def spread_tensors(self, device: Any, distance: str) -> tuple[Any, Any]:
        """(q50, s) per adapter as float32 torch tensors on ``device``, in ``distance``'s units."""
        import torch

        key = f"spread:{device}:{distance}"
        if key not in self._cache:
            units = self.units(distance)
            self._cache[key] = (torch.as_tensor(units.q50, dtype=torch.float32, device=device),
                                torch.as_tensor(units.s, dtype=torch.float32, device=device))
        return self._cache[key]

    def tensors(self, device: Any) -> tuple[Any, Any]:
        """(centroids, owner) as torch tensors on ``device``, copied there once per table."""
        import torch

        key = str(device)
        if key not in self._cache:
            owner = None if self.one_per_adapter else torch.as_tensor(self.owner, device=device)
            self._cache[key] = (torch.as_tensor(self.vectors, device=device), owner)
        return self._cache[key]

    @functools.cached_property
    def one_per_adapter(self) -> bool:
        """Row i is adapter i's only centroid: the min over centroids can be skipped."""
        return len(self.owner) == self.n_adapters and bool((self.owner == np.arange(self.n_adapters)).all())

    def spliced(self, keep: np.ndarray, at: np.ndarray,
                new: "CentroidTable | None") -> tuple["CentroidTable", np.ndarray, np.ndarray]:
        """This table with the adapters where ``keep`` is False dropped and ``new``'s adapters
        (None: none) inserted, in order, before the kept adapters at positions ``at``
        (non-decreasing, indices among the kept ones, as ``np.insert`` takes them): what a
        library's change makes of its table, without rebuilding the rows that stay.

        Returns:
            (the table, kept_rows: (C,) bool over this table's rows, added_rows: (C',) bool over
            the new table's rows), which is what an index over the rows needs to follow.
        """
        if len(self.owner) and (np.diff(self.owner) < 0).any():
            raise InvalidInputError("spliced() needs each adapter's rows together, in adapter order (as from_lists makes them)")
        if new is None:
            new = CentroidTable(self.vectors[:0], self.owner[:0], 0, None)
        counts = np.bincount(self.owner, minlength=self.n_adapters)
        kept_rows = np.repeat(keep, counts)
        kept_counts, new_counts = counts[keep], np.bincount(new.owner, minlength=new.n_adapters)
        starts = np.concatenate(([0], np.cumsum(kept_counts)))
        at_rows = np.repeat(starts[at], new_counts)
        counts = np.insert(kept_counts, at, new_counts)
        n = len(counts)
        vectors, added_rows = _spliced_rows(self.vectors, kept_rows, at_rows, new.vectors)
        spread = None
        if self.spread is not None or new.spread is not None:
            mine = self.spread if self.spread is not None else np.full((self.n_adapters, 3), np.nan)
            theirs = new.spread if new.spread is not None else np.full((new.n_adapters, 3), np.nan)
            spread = np.insert(np.asarray(mine, dtype=np.float64)[keep], at, theirs, axis=0)
        table = CentroidTable(vectors, np.repeat(np.arange(n, dtype=np.int64), counts), n, spread)
        return table, kept_rows, added_rows

    @classmethod
    def from_lists(cls, centroids_per_adapter: Sequence[Sequence[Sequence[float]]],
                   spreads: Sequence[Sequence[float] | None] | None = None) -> "CentroidTable":
        """A table from each adapter's centroids and (optionally) its (q50, q90, q99) spread
        (None for a version-1 adapter)."""
        counts = [len(cents) for cents in centroids_per_adapter]
        if not sum(counts):
            raise InvalidInputError("the library is empty")
        vectors = np.asarray(list(itertools.chain.from_iterable(centroids_per_adapter)), dtype=np.float32)
        spread = None
        if spreads is not None:
            if len(spreads) != len(centroids_per_adapter):
                raise InvalidInputError(f"{len(spreads)} spreads for {len(centroids_per_adapter)} adapters")
            spread = np.full((len(spreads), 3), np.nan)
            for i, row in enumerate(spreads):
                if row is not None:
                    spread[i] = np.asarray(row, dtype=np.float64)[:3]
        return cls.from_rows(vectors, counts, spread, copy=False)  # its own array: normalised in place

    @classmethod
    def from_rows(cls, vectors: np.ndarray, counts: Sequence[int] | np.ndarray,
                  spread: np.ndarray | None = None, *, copy: bool = True) -> "CentroidTable":
        """A table from every centroid row, adapter after adapter (``counts[a]`` rows for adapter
        a), normalised here in float32: in a copy, or (``copy=False``, for a caller handing over
        an array it does not keep) in ``vectors`` itself when it is float32 already."""
        vectors = np.array(vectors, dtype=np.float32) if copy else np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise InvalidInputError(f"centroid rows must be a 2-d array, got shape {vectors.shape}")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        counts = np.asarray(counts, dtype=np.int64)
        return cls(vectors, np.repeat(np.arange(len(counts), dtype=np.int64), counts), len(counts), spread)


#: A splice copies its kept rows run by run (one pass over memory) up to this many runs; a
#: larger change gathers them (two passes: a gather, then the assignment).
_MAX_RUNS = 4096


def _spliced_rows(rows: np.ndarray, kept: np.ndarray, at: np.ndarray,
                  new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.insert(rows[kept], at, new, axis=0)`` and the mask of the inserted rows in it, with the
    kept rows copied once: the runs between the changes are copied whole (a splice at 1M rows is
    a copy of 256 MB, so a second pass is what it costs)."""
    src = np.flatnonzero(kept)
    added = np.zeros(len(src) + len(new), dtype=bool)
    added[at + np.arange(len(at))] = True
    dest = np.flatnonzero(~added)
    out = np.empty((len(added), rows.shape[1]), dtype=rows.dtype)
    out[added] = new
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dest) != 1)) + 1
    if len(breaks) < _MAX_RUNS:
        for start, end in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(src)].tolist()):
            if end > start:
                out[dest[start] : dest[start] + end - start] = rows[src[start] : src[start] + end - start]
    else:
        out[dest] = rows[src]
    return out, added


def unit_queries(queries: np.ndarray) -> np.ndarray:
    """(Q, D) query embeddings as float32 unit rows, normalised in float64 after scaling each row by
    its largest magnitude (the square sum of large finite values stays finite).

    Raises:
        InvalidInputError: not a (Q, D) array, or a row that is not finite or is all zero.
    """
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim != 2:
        raise InvalidInputError("queries must be a (Q, D) array")
    peak = np.abs(q).max(axis=1, keepdims=True) if q.size else q
    if not (np.isfinite(q).all() and (peak > 0).all()):
        raise InvalidInputError("every query embedding must be finite and non-zero")
    q = q / peak
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def similarities(queries: np.ndarray, table: CentroidTable) -> np.ndarray:
    """(Q, C) similarities of the unit ``queries`` (Q, D) to the table's vectors.

    One query against a table that keeps its columns (:meth:`CentroidTable.keep_columns`: the
    registry's brute-force tables) is a product with the vectors laid out dimension by
    dimension: BLAS streams the table once, adding one dimension at a time into the answer,
    where the rows' layout takes a 64-long dot product per centroid (measured at 100k 64-d
    centroids, one thread: 0.63 against 0.94 ms). Otherwise the rows against the queries, a view
    of one product (4x faster than ``queries @ vectors.T``, and faster than the columns for two
    queries or more).
    """
    columns = table._cache.get("columns")
    if columns is not None and len(queries) == 1:
        return queries @ columns
    return (table.vectors @ queries.T).T


def retrieve_numpy(
    queries: np.ndarray,
    table: CentroidTable,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float | None = None,
    distance: str = DEFAULT_DISTANCE,
    weighting: str = DEFAULT_WEIGHTING,
    guard: bool = False,
    guard_z: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k adapters per query and their fusion weights.

    Args:
        queries: (Q, D) embeddings (normalised here).
        temperature: the weighting's temperature; None: the scheme's default
            (:func:`semla.registry.weighting.default_temperature`).
        weighting: a scheme of :data:`semla.registry.weighting.WEIGHTINGS`.
        guard: the base model (a zero adapter) takes part in the softmax at ``guard_z``
            (None: the library's default position).

    Returns:
        (indices (Q, k) int64 adapter indices nearest first, distances (Q, k), weights (Q, k)),
        with k = min(top_k, number of adapters). Each weight row sums to 1, or with the guard
        to ``1 - base weight``.

    Raises:
        InvalidInputError: bad distance, top-k, temperature or queries.
        InvalidInputError: unknown weighting or guard_z out of range.
    """
    _check(distance, top_k, temperature, weighting, guard_z)
    sim = similarities(unit_queries(queries), table)
    if table.one_per_adapter:
        s_adapter = sim
    else:  # every distance falls as the similarity rises: an adapter's nearest centroid is its most similar
        s_adapter = np.full((sim.shape[0], table.n_adapters), -np.inf, dtype=sim.dtype)
        np.maximum.at(s_adapter, (slice(None), table.owner), sim)
    idx, dist = _nearest(s_adapter, min(top_k, table.n_adapters), distance)
    return idx, dist, weigh_numpy(dist, idx, table, temperature=temperature, distance=distance,
                                  weighting=weighting, guard=guard, guard_z=guard_z)


def _nearest(sim: np.ndarray, k: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest adapters of each row of ``sim`` ((Q, A) similarities), nearest first, ties
    at equal distance to the lower index: a stable sort of every adapter's distance, computed from
    the k + 1 most similar alone.

    Every distance is a non-increasing function of the similarity, so the k most similar adapters
    are k nearest ones; when the (k+1)-th most similar is strictly farther than all of them, no
    other adapter ties with them and the answer is exact. A row where it is not (equal or rounded-
    together similarities at the boundary) takes every adapter's distance.
    """
    n = sim.shape[1]
    if k >= n:
        return _stable_nearest(distance_from_similarity(sim, distance), k)
    part = _most_similar(sim, k + 1)  # column 0: the (k+1)-th most similar
    rows = np.arange(len(sim))[:, None]
    d_part = distance_from_similarity(sim[rows, part], distance)
    top, d_top = part[:, 1:], d_part[:, 1:]
    order = np.lexsort((top, d_top), axis=1)  # by distance, then by index
    idx, dist = top[rows, order], d_top[rows, order]
    for row in np.flatnonzero(d_part[:, 0] <= dist[:, -1]):  # a tie may reach past the k
        row_idx, row_dist = _stable_nearest(distance_from_similarity(sim[row : row + 1], distance), k)
        idx[row], dist[row] = row_idx[0], row_dist[0]
    return idx, dist


#: Above this many adapters :func:`_most_similar` narrows each row to blocks' maxima first.
_BLOCKED_ABOVE = 16_384
_BLOCK = 1024


def _most_similar(sim: np.ndarray, m: int) -> np.ndarray:
    """(Q, m) column indices of the ``m`` largest of each row of ``sim`` (m < columns), in
    :func:`numpy.argpartition`'s arrangement: column 0 holds the m-th largest, the rest are at
    least as large.

    Over a large library one partial selection of every row costs more than the similarities
    themselves (0.5 ms at 100k adapters). The row is cut in blocks of :data:`_BLOCK`; the m-th
    largest block maximum ``t`` is reached by m elements of m distinct blocks, so the m largest are
    all at least ``t``; they lie in the blocks whose maximum reaches ``t``, and the selection runs
    over those blocks' elements that reach it (a few dozen where the similarities are spread;
    every element where they are all equal, which stays exact).
    """
    q, n = sim.shape
    if n <= _BLOCKED_ABOVE or m > n // _BLOCK:
        return np.argpartition(sim, n - m, axis=1)[:, n - m:]
    whole = n - n % _BLOCK
    peaks = sim[:, :whole].reshape(q, -1, _BLOCK).max(axis=2)
    if whole < n:
        peaks = np.concatenate([peaks, sim[:, whole:].max(axis=1, keepdims=True)], axis=1)
    floor = np.partition(peaks, peaks.shape[1] - m, axis=1)[:, peaks.shape[1] - m]
    out = np.empty((q, m), dtype=np.int64)
    for row in range(q):  # only the blocks whose maximum reaches the floor hold candidates
        blocks = np.flatnonzero(peaks[row] >= floor[row])
        at = (blocks[:, None] * _BLOCK + np.arange(_BLOCK)).ravel()
        at = at[at < n]  # the last block may be partial
        cand = at[sim[row, at] >= floor[row]]
        out[row] = cand[np.argpartition(sim[row, cand], len(cand) - m)[len(cand) - m:]]
    return out


def _stable_nearest(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest of each row of ``d`` ((Q, A) distances), smallest first, ties to the lower index."""
    if k < d.shape[1]:  # partial selection first: O(n) instead of sorting the library
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(d, part, axis=1).max(axis=1, keepdims=True)
        cand = [np.flatnonzero(row <= t) for row, t in zip(d, kth)]
        idx = np.stack([c[np.argsort(row[c], kind="stable")][:k] for c, row in zip(cand, d)])
    else:
        idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


def weigh_numpy(dist: np.ndarray, idx: np.ndarray, table: CentroidTable, *, temperature: float | None = None,
                distance: str = DEFAULT_DISTANCE, weighting: str = DEFAULT_WEIGHTING, guard: bool = False,
                guard_z: float | None = None) -> np.ndarray:
    """The fusion weights of already retrieved adapters (``idx``, ``dist``: (Q, k)) of ``table``."""
    return _weighting.weights_numpy(dist, idx, table.spreads, weighting=weighting, temperature=temperature,
                                    guard=guard, guard_z=guard_z, distance=distance, units=table.units(distance))


def retrieve_torch(
    queries: Any,
    table: CentroidTable,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float | None = None,
    distance: str = DEFAULT_DISTANCE,
    device: Any = None,
    weighting: str = DEFAULT_WEIGHTING,
    guard: bool = False,
    guard_z: float | None = None,
) -> tuple[Any, Any, Any]:
    """Torch twin of :func:`retrieve_numpy`; tensors on ``device`` (default: the queries')."""
    import torch

    _check(distance, top_k, temperature, weighting, guard_z)
    q = torch.as_tensor(queries, dtype=torch.float32, device=device)
    if not bool(torch.isfinite(q).all()):
        raise InvalidInputError("every query embedding must be finite")
    q = torch.nn.functional.normalize(q / q.abs().amax(dim=1, keepdim=True).clamp(min=1e-30), dim=1)
    cents, owner = table.tensors(q.device)
    sim = q @ cents.T  # (Q, C)
    d_cent = distance_from_similarity(sim, distance)
    if table.one_per_adapter:
        d_adapter = d_cent
    else:
        d_adapter = torch.full((q.shape[0], table.n_adapters), float("inf"), device=q.device)
        d_adapter = d_adapter.scatter_reduce(1, owner.expand_as(d_cent), d_cent, reduce="amin")
    k = min(top_k, table.n_adapters)
    dist, idx = torch.topk(d_adapter, k, dim=1, largest=False, sorted=True)
    weights = _weighting.weights_torch(dist, idx, table.spreads, weighting=weighting, temperature=temperature,
                                       guard=guard, guard_z=guard_z, distance=distance,
                                       spread_tensors=table.spread_tensors(q.device, distance),
                                       units=table.units(distance))
    return idx, dist, weights
