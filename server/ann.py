"""Approximate nearest-neighbour index over a library's centroids (DESIGN §4, large libraries).

Brute force (:func:`semla.registry.retrieval.retrieve_numpy`) stays the answer up to
``ANN_THRESHOLD`` centroids; above it :class:`CentroidIndex` narrows each query to a few
candidate adapters with a FAISS inverted-file index (IVF-Flat, inner product) and then re-ranks
those candidates *exactly* with numpy, so every returned distance and weight equals brute
force's for the same adapter (only which adapters make the top-k is approximate).

Why FAISS (faiss-cpu) rather than usearch, measured here on 2 shared cores, numpy 2.4,
Python 3.11 (both install cleanly from wheels): at 100k 512-d unit vectors FAISS built an
HNSW graph (M=32) in 59 s against usearch's 175 s (connectivity 16) / 333 s (32), and at equal
search effort FAISS answered faster (1.8 vs 4.9 ms per query at ef=256) with equal or better
recall; FAISS's IVF-Flat builds in 11 s and needs no graph at all, which is what makes a 1M
rebuild affordable. The wheels are comparable (faiss-cpu 18.8 MB; usearch 2.3 MB + its
required numkong 10.6 MB).

The server stays torch-free: this module imports numpy, faiss and the (lazy-torch) retrieval
helpers only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import faiss
import numpy as np

from semla.registry.distances import distance_from_similarity
from semla.schemas.errors import InvalidInputError

from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TOP_K,
    DEFAULT_WEIGHTING,
    CentroidTable,
    _check,
    retrieve_numpy,
    unit_queries,
    weigh_numpy,
)

__all__ = [
    "ANN_THRESHOLD",
    "IVF_CENTROIDS_PER_LIST",
    "IVF_NPROBE",
    "IVF_TRAIN_PER_LIST",
    "OVERFETCH",
    "CentroidIndex",
    "choose",
]

#: Brute force up to this many centroids (inclusive), the ANN index above (DESIGN: ~100k).
ANN_THRESHOLD = 100_000

#: IVF lists: one per this many centroids (1M centroids → 976 lists of ~1024).
IVF_CENTROIDS_PER_LIST = 1024
#: Lists visited per query (of 976 at 1M). At 1M clustered centroids, recall@5 vs brute force
#: is ~0.99 for in-distribution queries (noisy copies of stored centroids), 4.5 ms per query;
#: uniformly random 512-d queries, equidistant from everything, get ~0.33 here and would need
#: most lists probed (~0.7 at 256). See benchmarks/results/retrieval_ann.json (nprobe_sweep).
IVF_NPROBE = 48
#: k-means training sample per list (FAISS wants ≥ 39; more only slows the build).
IVF_TRAIN_PER_LIST = 64
#: Centroids fetched per query = top_k × (most centroids of any adapter) × OVERFETCH, so that
#: even adapters with many centroids leave ≥ OVERFETCH × top_k distinct candidates.
OVERFETCH = 4
#: Seed of the training sample and of FAISS's k-means (index builds are reproducible).
SEED = 1234


def choose(table: CentroidTable) -> Literal["brute", "ann"]:
    """``"brute"`` up to :data:`ANN_THRESHOLD` centroids, ``"ann"`` above."""
    return "brute" if len(table.vectors) <= ANN_THRESHOLD else "ann"


def _rows_by_owner(table: CentroidTable) -> tuple[np.ndarray, np.ndarray, int]:
    """(order, starts, max_per_adapter): the rows sorted by owner, where each adapter's start."""
    owner = np.asarray(table.owner, dtype=np.int64)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=table.n_adapters)
    starts = np.zeros(table.n_adapters + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return order, starts, int(counts.max(initial=0))


def _distance(sim: np.ndarray, distance: str) -> np.ndarray:
    # Exactly retrieve_numpy's formulas, so re-ranked distances equal brute force's.
    return distance_from_similarity(sim, distance)


@dataclasses.dataclass(frozen=True)
class CentroidIndex:
    """An IVF index over ``table.vectors`` plus the adapter → centroid rows map for re-ranking.

    Build once per table (:meth:`build`), then :meth:`search` from any number of threads
    (FAISS searches are read-only; ``nprobe`` is passed per call).
    """

    table: CentroidTable
    index: faiss.Index
    nprobe: int
    #: Centroid rows sorted by owner; adapter a's rows are ``order[starts[a]:starts[a + 1]]``.
    order: np.ndarray
    starts: np.ndarray
    max_per_adapter: int
    #: The FAISS id of each table row (ids outlive the row positions an update shifts) ...
    row_ids: np.ndarray
    #: ... and the table row of each id (-1: removed); None while ids are the row positions.
    row_of_id: np.ndarray | None = None
    #: The id the next added row gets.
    next_id: int = 0
    #: Centroids the coarse quantiser was trained on (an update that strays far from it rebuilds).
    trained_on: int = 0

    @classmethod
    def build(cls, table: CentroidTable, *, nlist: int | None = None,
              nprobe: int | None = None) -> "CentroidIndex":
        """Train the coarse quantiser on a sample and add every centroid.

        Args:
            nlist, nprobe: override :data:`IVF_CENTROIDS_PER_LIST` / :data:`IVF_NPROBE`
                (tests use them to exercise a real multi-list index on a small table).
        """
        vectors = np.ascontiguousarray(table.vectors, dtype=np.float32)
        n, dim = vectors.shape
        if n == 0:
            raise InvalidInputError("the library is empty")
        nlist = max(1, min(n, nlist if nlist is not None else n // IVF_CENTROIDS_PER_LIST))
        nprobe = max(1, min(nlist, nprobe if nprobe is not None else IVF_NPROBE))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = SEED
        n_train = min(n, max(nlist * IVF_TRAIN_PER_LIST, 1))
        rng = np.random.default_rng(SEED)
        sample = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(sample)
        index.add(vectors)
        index.nprobe = nprobe
        return cls(table, index, nprobe, *_rows_by_owner(table), row_ids=np.arange(n, dtype=np.int64),
                   next_id=n, trained_on=n)

    def updated(self, table: CentroidTable, kept: np.ndarray, added: np.ndarray) -> "CentroidIndex":
        """This index moved to ``table``, a later version of its table, without retraining.

        ``kept``: (C_old,) bool, the old rows still in ``table``, which holds them in their old
        order; ``added``: (C_new,) bool, the rows of ``table`` that are new. The index is copied
        (searches on this one go on meanwhile), the dropped rows' vectors removed and the new
        ones added under fresh ids. The quantiser stays the one trained at :meth:`build`; once
        the table has halved or doubled since, or ids have run to twice the rows, the index is
        built again instead.
        """
        n, n_added = len(table.vectors), int(added.sum())
        if not self.trained_on / 2 <= n <= self.trained_on * 2 or self.next_id + n_added > 2 * n:
            return CentroidIndex.build(table, nprobe=self.nprobe)
        index = faiss.clone_index(self.index)
        gone = self.row_ids[~kept]
        if len(gone):
            index.remove_ids(np.ascontiguousarray(gone))
        row_ids = np.empty(n, dtype=np.int64)
        row_ids[~added] = self.row_ids[kept]
        row_ids[added] = np.arange(self.next_id, self.next_id + n_added, dtype=np.int64)
        if n_added:
            index.add_with_ids(np.ascontiguousarray(table.vectors[added], dtype=np.float32), row_ids[added])
        row_of_id = np.full(self.next_id + n_added, -1, dtype=np.int64)
        row_of_id[row_ids] = np.arange(n, dtype=np.int64)
        return CentroidIndex(table, index, self.nprobe, *_rows_by_owner(table), row_ids=row_ids,
                             row_of_id=row_of_id, next_id=self.next_id + n_added, trained_on=self.trained_on)

    def search(
        self,
        queries: np.ndarray,
        *,
        top_k: int = DEFAULT_TOP_K,
        temperature: float | None = None,
        distance: str = DEFAULT_DISTANCE,
        weighting: str = DEFAULT_WEIGHTING,
        guard: bool = False,
        guard_z: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as :func:`~semla.registry.retrieval.retrieve_numpy`.

        Returns:
            (indices (Q, k) int64 adapter indices nearest first, distances (Q, k) float32,
            weights (Q, k) float32), k = min(top_k, number of adapters). Distances are the
            exact brute-force distances of the returned adapters; ties keep the lower index.
        """
        _check(distance, top_k, temperature, weighting, guard_z)
        table = self.table
        q = unit_queries(queries)
        if q.shape[1] != table.vectors.shape[1]:
            raise InvalidInputError(f"queries have dimension {q.shape[1]}, the centroids {table.vectors.shape[1]}")
        k = min(top_k, table.n_adapters)
        n_fetch = min(len(table.vectors), k * self.max_per_adapter * OVERFETCH)
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, rows = self.index.search(q, n_fetch, params=params)  # (Q, n_fetch), -1 = no hit

        idx = np.empty((q.shape[0], k), dtype=np.int64)
        dist = np.empty((q.shape[0], k), dtype=np.float32)
        for i in range(q.shape[0]):
            hit = rows[i][rows[i] >= 0]
            if self.row_of_id is not None:
                hit = self.row_of_id[hit]
            cand = np.unique(table.owner[hit])  # sorted adapter indices
            if len(cand) < k:  # the probed lists held too few adapters: answer by brute force
                idx[i : i + 1], dist[i : i + 1], _ = retrieve_numpy(q[i : i + 1], table, top_k=k,
                                                                    distance=distance)
                continue
            idx[i], dist[i] = self._rerank(q[i], cand, k, distance)
        return idx, dist, weigh_numpy(dist, idx, table, temperature=temperature, distance=distance,
                                      weighting=weighting, guard=guard, guard_z=guard_z)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact adapter distances (min over all their centroids) for ``cand``; top-k of them."""
        table = self.table
        if self.max_per_adapter == 1:
            d = _distance(table.vectors[self.order[self.starts[cand]]] @ q, distance)
        else:
            lo, hi = self.starts[cand], self.starts[cand + 1]
            lengths = hi - lo
            seg = np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            d_rows = _distance(table.vectors[self.order[seg]] @ q, distance)
            offsets = np.cumsum(lengths) - lengths
            d = np.minimum.reduceat(d_rows, offsets)
        d = d.astype(np.float32, copy=False)
        # cand is ascending, so a stable sort by distance breaks ties by adapter index, as
        # retrieve_numpy's stable argsort over all adapters does.
        top = np.argsort(d, kind="stable")[:k]
        return cand[top], d[top]
