"""Retrieval: numpy (server) and torch (node) agree; min over centroids; softmax weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semla.registry.retrieval import CentroidTable, retrieve_numpy, retrieve_torch


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
