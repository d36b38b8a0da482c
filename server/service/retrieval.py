"""Server-side SemLA retrieval over one base's newest adapters, with the centroid table cached
by the library-version counter.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.registry.weighting import base_weight_of, check_weighting
from semla.schemas import AdapterSummary, RetrievedAdapter, RetrieveRequest, RetrieveResponse
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import InvalidInputError, NotFoundError
from semla.server.db import library_version
from semla.server.service.core import ServiceCore
from semla.server.service.library import newest_summaries

logger = logging.getLogger(__name__)

__all__ = ["RetrievalPart"]


def _retrievable(summaries: list[AdapterSummary], card: BaseCard | None) -> list[AdapterSummary]:
    """The adapters whose centroids retrieval can use: finite, non-zero, of the card's dimension
    (without a card: the most common one). Uploads are checked against the card, so this only
    leaves out rows stored before that check, or under another card; each is logged."""
    dims = Counter(len(c) for a in summaries for c in a.centroids)
    if not dims:
        return []
    dim = card.embedding.dim if card is not None else dims.most_common(1)[0][0]
    usable = []
    for a in summaries:
        vectors = np.asarray(a.centroids, dtype=np.float64) if all(len(c) == dim for c in a.centroids) else None
        if vectors is None or not np.isfinite(vectors).all() or not (np.linalg.norm(vectors, axis=1) > 0.5).all():
            logger.warning("retrieval leaves out %s v%d: its centroids are not %d-dimensional unit vectors",
                           a.name, a.version, dim)
            continue
        usable.append(a)
    return usable


class RetrievalPart(ServiceCore):
    """``POST /v1/retrieve``."""

    def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """Brute-force SemLA retrieval (numpy, the node's math) over the newest adapters of a base.

        Raises:
            NotFoundError: no adapter of this base model.
            InvalidInputError: the embedding's dimension differs from the centroids', or an
                unknown weighting scheme (``unknown_weighting``).
        """
        check_weighting(body.weighting)  # before any table is built: a bad name is the caller's 400
        table, summaries, index = self._centroid_table(body.base_fingerprint)
        dim = table.vectors.shape[1]
        if len(body.embedding) != dim:
            raise InvalidInputError(f"embedding has {len(body.embedding)} dimensions; "
                                    f"the centroids of this base have {dim}")
        query = np.asarray([body.embedding], dtype=np.float64)  # both searches scale and normalise it
        options = {"top_k": body.top_k, "temperature": body.temperature, "distance": body.distance,
                   "weighting": body.weighting, "guard": body.guard, "guard_z": body.guard_z}
        idx, dist, weights = index.search(query, **options) if index is not None else retrieve_numpy(query, table, **options)
        return RetrieveResponse(results=[
            RetrievedAdapter(name=summaries[i].name, version=summaries[i].version, publisher=summaries[i].publisher,
                             distance=float(d), weight=float(w))
            for i, d, w in zip(idx[0].tolist(), dist[0].tolist(), weights[0].tolist())
        ], base_weight=float(base_weight_of(weights)[0]) if body.guard else 0.0, weighting=body.weighting)

    def _centroid_table(self, fingerprint: str) -> tuple[CentroidTable, list[AdapterSummary], Any]:
        """The centroid table of one base (with an ANN index above ``ann.ANN_THRESHOLD``
        centroids; brute force below), rebuilt only when the library has changed (checked on
        every call, so replicas sharing a database stay consistent)."""
        with self._reads() as conn:  # two statements, in autocommit: the rows are at least as new as
            # the counter read first, so a table is never older than its label (at worst rebuilt once more)
            generation = library_version(conn)  # changes with every publish or revocation
            cached = self._tables.get(fingerprint)
            if cached is not None and cached[0] == generation:
                return cached[1:]
            newest = newest_summaries(conn, base=fingerprint)
        summaries = _retrievable(newest, self.base_cards.cards().get(fingerprint))
        if not summaries:
            raise NotFoundError(f"no adapter for base model {fingerprint[:12]}")
        table = CentroidTable.from_lists([a.centroids for a in summaries], [a.spread for a in summaries])
        from semla.server import ann  # faiss is imported with it: on the first retrieval only

        index = ann.CentroidIndex.build(table) if ann.choose(table) == "ann" else None
        if len(self._tables) >= 8:
            self._tables.pop(next(iter(self._tables)))
        self._tables[fingerprint] = (generation, table, summaries, index)
        return table, summaries, index
