"""Retrieval: numpy (server) and torch (node) agree; min over centroids; softmax weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semla.registry import retrieval
from semla.registry.retrieval import CentroidTable, retrieve_numpy, retrieve_torch
from semla.schemas.errors import InvalidInputError


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("per_adapter", [1, 3])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_numpy_and_torch_agree(distance, per_adapter):
    rng = np.random.default_rng(0)
    table = CentroidTable.from_lists([_unit(rng, int(rng.integers(1, per_adapter + 1)), 32) for _ in range(40)])
    assert table.one_per_adapter == (per_adapter == 1)
    queries = rng.normal(size=(16, 32))
    i_np, d_np, w_np = retrieve_numpy(queries, table, top_k=5, temperature=0.05, distance=distance)
    i_t, d_t, w_t = retrieve_torch(torch.from_numpy(queries), table, top_k=5, temperature=0.05, distance=distance)
    assert np.array_equal(i_np, i_t.numpy())
    assert np.allclose(d_np, d_t.numpy(), atol=1e-5)
    assert np.allclose(w_np, w_t.numpy(), atol=1e-5)
    assert np.allclose(w_np.sum(1), 1.0, atol=1e-6)


def test_distance_is_min_over_centroids_and_weights_follow_softmax():
    e = np.eye(3, dtype=np.float32)
    table = CentroidTable.from_lists([[e[0]], [e[1], e[2]]])
    idx, dist, w = retrieve_numpy(e[2:3], table, top_k=5, temperature=0.5, weighting="neg-distance")
    assert idx.tolist() == [[1, 0]]  # capped at the library size, nearest first
    assert np.allclose(dist, [[0.0, np.sqrt(2)]], atol=1e-6)
    expected = np.exp(-dist[0] / 0.5) / np.exp(-dist[0] / 0.5).sum()
    assert np.allclose(w[0], expected, atol=1e-6)


def test_bad_arguments_are_refused():
    table = CentroidTable.from_lists([[np.ones(4)]])
    with pytest.raises(ValueError, match="valid"):
        retrieve_numpy(np.ones((1, 4)), table, distance="manhattan")
    with pytest.raises(ValueError):
        retrieve_numpy(np.ones((1, 4)), table, temperature=0)


def test_each_api_distance_has_one_definition_for_numpy_and_torch():
    from semla.registry.distances import DISTANCE_FUNCTIONS, distance_from_similarity
    from semla.schemas.api import DISTANCES

    assert tuple(DISTANCE_FUNCTIONS) == DISTANCES
    sim = np.array([1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    expected = {"euclidean": [0.0, 1.0, np.sqrt(2.0), 2.0], "cosine": [0.0, 0.5, 1.0, 2.0]}
    for name in DISTANCES:
        got_np = distance_from_similarity(sim, name)
        got_torch = distance_from_similarity(torch.from_numpy(sim), name).numpy()
        assert np.allclose(got_np, expected[name]) and np.allclose(got_torch, expected[name]), name
        # a euclidean spread in this distance's units agrees with the distance of the same pair
        assert np.allclose(DISTANCE_FUNCTIONS[name].from_euclidean(np.asarray(expected["euclidean"])), expected[name])


@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-selection", "blocks"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_top_k_from_the_most_similar_equals_a_stable_sort_of_every_distance(distance, blocked, columns, monkeypatch):
    """The brute-force search computes distances for the k + 1 most similar adapters only; it must
    answer exactly what sorting every adapter's distance (stable: ties to the lower index) answers,
    with duplicate centroids, rounded (tied) vectors and several centroids per adapter; also when
    the most similar are found through blocks' maxima (blocks of 3 here), and for lone queries
    against a table that keeps its columns."""
    from semla.registry.distances import distance_from_similarity
    from semla.registry.retrieval import _stable_nearest, similarities, unit_queries

    if blocked:
        monkeypatch.setattr(retrieval, "_BLOCKED_ABOVE", 4)
        monkeypatch.setattr(retrieval, "_BLOCK", 3)
    rng = np.random.default_rng(7)
    for trial in range(120):
        n_adapters, dim = int(rng.integers(1, 40)), int(rng.integers(2, 5))
        per = rng.integers(1, 3, n_adapters) if trial % 2 else np.ones(n_adapters, int)
        vectors = rng.standard_normal((int(per.sum()), dim)).round(trial % 3)  # rounding to 0 decimals: many ties
        vectors[np.abs(vectors).sum(axis=1) == 0] = 1.0
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        bounds = np.cumsum(per)[:-1]
        table = CentroidTable.from_lists([part.tolist() for part in np.split(vectors, bounds)])
        queries = rng.standard_normal((3, dim)).round(trial % 2)
        queries[np.abs(queries).sum(axis=1) == 0] = 1.0
        if columns:
            table.keep_columns()
            sim = np.concatenate([similarities(unit_queries(queries[i : i + 1]), table) for i in range(3)])
        else:
            sim = unit_queries(queries) @ table.vectors.T
        d = distance_from_similarity(sim, distance)
        d_adapter = np.full((3, n_adapters), np.inf, dtype=np.float32)
        np.minimum.at(d_adapter, (slice(None), table.owner), d)
        for k in (1, 3, 5, 50):
            if columns:  # one query at a time: a request's
                found = [retrieve_numpy(queries[i : i + 1], table, top_k=k, distance=distance) for i in range(3)]
                idx, dist = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
            else:
                idx, dist, _ = retrieve_numpy(queries, table, top_k=k, distance=distance)
            want_idx, want_dist = _stable_nearest(d_adapter, min(k, n_adapters))
            np.testing.assert_array_equal(idx, want_idx)
            np.testing.assert_array_equal(dist, want_dist)


def test_the_most_similar_through_blocks_are_those_one_selection_finds():
    """A 100k library's rows, with ties and with every similarity equal: the same set, and column 0
    the m-th largest value, as argpartition over the whole row."""
    from semla.registry.retrieval import _BLOCKED_ABOVE, _most_similar

    rng = np.random.default_rng(3)
    n = 100_003  # a partial last block
    assert n > _BLOCKED_ABOVE
    sim = rng.standard_normal((4, n)).astype(np.float32)
    sim[1] = sim[1].round(1)  # many ties, at the boundary too
    sim[2] = 0.25  # all equal: every element is a candidate
    sim[3, -2:] = 9.0  # the largest in the partial block
    for m in (1, 2, 6, 51):
        got = _most_similar(sim, m)
        want = np.argpartition(sim, n - m, axis=1)[:, n - m:]
        for row in range(len(sim)):
            assert np.array_equal(np.sort(sim[row, got[row]]), np.sort(sim[row, want[row]]))
            assert sim[row, got[row, 0]] == sim[row, want[row, 0]] == sim[row, got[row]].min()
            assert len(set(got[row].tolist())) == m
    assert set(_most_similar(sim[3:], 2)[0].tolist()) == {n - 2, n - 1}


def test_a_lone_query_against_a_table_that_keeps_its_columns_takes_them():
    """keep_columns() lays the vectors out by dimension once; a lone query's similarities then
    come from that layout (contiguous, equal to the rows' product up to rounding), two queries'
    from the rows, and a table that keeps none answers from the rows alone."""
    from semla.registry.retrieval import similarities, unit_queries

    rng = np.random.default_rng(5)
    table = CentroidTable.from_lists([[v] for v in unit_queries(rng.standard_normal((3001, 64)))])
    queries = unit_queries(rng.standard_normal((2, 64)))
    rows = (table.vectors @ queries.T).T
    assert np.array_equal(similarities(queries[:1], table), (table.vectors @ queries[:1].T).T)
    assert table.keep_columns() is table and table.keep_columns()._cache["columns"].shape == (64, 3001)
    lone = similarities(queries[:1], table)
    assert lone.shape == (1, 3001) and lone.flags.c_contiguous
    assert np.array_equal(lone, queries[:1] @ np.ascontiguousarray(table.vectors.T))
    assert np.allclose(lone, rows[:1], atol=1e-6)
    assert np.array_equal(similarities(queries, table), rows)


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("max_runs", [4096, 0], ids=["run-by-run", "gathered"])
def test_a_spliced_table_equals_one_built_from_the_spliced_list(seed, max_runs, monkeypatch):
    """Adapters dropped and others inserted (several centroids each, with and without a spread)
    give the very table from_lists builds from the resulting list, and the row masks an index
    follows, whether the kept rows are copied run by run or gathered."""
    monkeypatch.setattr(retrieval, "_MAX_RUNS", max_runs)
    rng = np.random.default_rng(seed)

    def adapter():
        cents = rng.normal(size=(int(rng.integers(1, 4)), 6)).tolist()
        return cents, (rng.uniform(0.1, 0.5, 3).tolist() if rng.random() < 0.5 else None)

    old = [adapter() for _ in range(12)]
    table = CentroidTable.from_lists([c for c, _ in old], [s for _, s in old])
    keep = rng.random(12) < 0.7
    kept = [a for a, k in zip(old, keep) if k]
    new = [adapter() for _ in range(5)]
    at = np.sort(rng.integers(0, len(kept) + 1, size=5))
    merged = list(kept)
    for offset, (pos, a) in enumerate(zip(at.tolist(), new)):
        merged.insert(pos + offset, a)
    got, kept_rows, added_rows = table.spliced(keep, at, CentroidTable.from_lists([c for c, _ in new], [s for _, s in new]))
    want = CentroidTable.from_lists([c for c, _ in merged], [s for _, s in merged])
    assert got.n_adapters == want.n_adapters and np.array_equal(got.owner, want.owner)
    assert np.array_equal(got.vectors, want.vectors) and np.array_equal(got.spread, want.spread, equal_nan=True)
    assert np.array_equal(got.vectors[~added_rows], table.vectors[kept_rows])
    assert added_rows.sum() == sum(len(c) for c, _ in new)
    dropped, _, _ = table.spliced(keep, np.zeros(0, dtype=np.int64), None)
    assert np.array_equal(dropped.vectors, CentroidTable.from_lists([c for c, _ in kept]).vectors)
    with pytest.raises(InvalidInputError):
        CentroidTable(table.vectors, table.owner[::-1].copy(), table.n_adapters).spliced(keep, at, None)
