"""server/ann.py: the IVF index answers like brute force (retrieve_numpy) on what it returns."""

from __future__ import annotations

import numpy as np
import pytest

from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.schemas.errors import InvalidInputError
from semla.server import ann

DIM = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _library(n_adapters: int, per_adapter: int, rng: np.random.Generator) -> CentroidTable:
    """Random unit vectors around random cluster centres (embeddings cluster; uniform noise
    in many dimensions has no near neighbours for any index to find)."""
    centres = _unit(rng.standard_normal((max(1, n_adapters // 50), DIM)))
    adapters = _unit(centres[rng.integers(0, len(centres), n_adapters)]
                     + 0.6 / np.sqrt(DIM) * rng.standard_normal((n_adapters, DIM)))
    vectors = _unit(np.repeat(adapters, per_adapter, axis=0)
                    + 0.3 / np.sqrt(DIM) * rng.standard_normal((n_adapters * per_adapter, DIM)))
    owner = np.repeat(np.arange(n_adapters, dtype=np.int64), per_adapter)
    return CentroidTable(vectors, owner, n_adapters)


def _queries(table: CentroidTable, n: int, rng: np.random.Generator) -> np.ndarray:
    near = table.vectors[rng.integers(0, len(table.vectors), n // 2)]
    near = near + 0.3 / np.sqrt(DIM) * rng.standard_normal(near.shape)
    return np.concatenate([near, rng.standard_normal((n - n // 2, DIM))]).astype(np.float32)


def _exact_adapter_distance(q: np.ndarray, table: CentroidTable, adapters: np.ndarray, distance: str):
    q = q / np.linalg.norm(q)
    out = []
    for a in adapters:
        sim = table.vectors[table.owner == a] @ q
        d = np.sqrt(np.clip(2 - 2 * sim, 0, None)) if distance == "euclidean" else 1 - sim
        out.append(d.min())
    return np.asarray(out)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def single():
    rng = np.random.default_rng(0)
    table = _library(20_000, 1, rng)
    # A real multi-list index (20k is far below ANN_THRESHOLD, so force nlist/nprobe).
    return table, ann.CentroidIndex.build(table, nlist=128, nprobe=40), _queries(table, 200, rng)


@pytest.fixture(scope="module")
def multi():
    rng = np.random.default_rng(1)
    table = _library(5_000, 4, rng)  # 20k centroids, 4 per adapter
    return table, ann.CentroidIndex.build(table, nlist=128, nprobe=40), _queries(table, 200, rng)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_recall_at_5_vs_brute_force(single, distance):
    table, index, queries = single
    truth, _, _ = retrieve_numpy(queries, table, top_k=5, distance=distance)
    idx, _, _ = index.search(queries, top_k=5, distance=distance)
    assert _recall(idx, truth) >= 0.95


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_returned_distances_are_exact(single, distance):
    table, index, queries = single
    idx, dist, _ = index.search(queries[:40], top_k=5, distance=distance)
    for q, i, d in zip(queries[:40], idx, dist):
        np.testing.assert_allclose(d, _exact_adapter_distance(q, table, i, distance), atol=1e-5)
        assert np.all(np.diff(d) >= 0)  # nearest first


def test_format_and_weights_match_retrieve_numpy(single):
    table, index, queries = single
    idx, dist, w = index.search(queries, top_k=5, temperature=0.07)
    b_idx, b_dist, b_w = retrieve_numpy(queries, table, top_k=5, temperature=0.07)
    assert idx.shape == dist.shape == w.shape == (len(queries), 5)
    assert idx.dtype == b_idx.dtype == np.int64 and dist.dtype == b_dist.dtype and w.dtype == b_w.dtype
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    same = (idx == b_idx).all(axis=1)  # rows where the ANN found the exact top-5
    assert same.mean() >= 0.8
    np.testing.assert_allclose(dist[same], b_dist[same], atol=1e-5)
    np.testing.assert_allclose(w[same], b_w[same], atol=1e-5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_multi_centroid_adapters_reduce_by_min(multi, distance):
    table, index, queries = multi
    assert index.max_per_adapter == 4
    truth, _, _ = retrieve_numpy(queries, table, top_k=5, distance=distance)
    idx, dist, w = index.search(queries, top_k=5, distance=distance)
    assert _recall(idx, truth) >= 0.95
    assert all(len(set(row)) == 5 for row in idx)  # each adapter once, not once per centroid
    for q, i, d in zip(queries[:30], idx, dist):
        np.testing.assert_allclose(d, _exact_adapter_distance(q, table, i, distance), atol=1e-5)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)


def test_min_over_centroids_small_exact():
    # Adapter 0's second centroid equals the query: its distance is 0 although its first is far.
    rng = np.random.default_rng(2)
    far = _unit(rng.standard_normal((3, DIM)))
    q = _unit(rng.standard_normal((1, DIM)))
    table = CentroidTable.from_lists([[far[0], q[0]], [far[1]], [far[2]]])
    index = ann.CentroidIndex.build(table, nlist=1)
    idx, dist, w = index.search(q, top_k=5)
    b_idx, b_dist, b_w = retrieve_numpy(q, table, top_k=5)
    assert idx.shape == (1, 3) and idx[0, 0] == 0 and dist[0, 0] == pytest.approx(0, abs=1e-3)
    np.testing.assert_array_equal(idx, b_idx)
    np.testing.assert_allclose(dist, b_dist, atol=1e-5)
    np.testing.assert_allclose(w, b_w, atol=1e-5)


def test_exact_when_every_list_is_probed():
    rng = np.random.default_rng(3)
    table = _library(2_000, 3, rng)
    index = ann.CentroidIndex.build(table, nlist=16, nprobe=16)
    queries = _queries(table, 50, rng)
    for distance in ("euclidean", "cosine"):
        idx, dist, w = index.search(queries, top_k=7, distance=distance)
        b_idx, b_dist, b_w = retrieve_numpy(queries, table, top_k=7, distance=distance)
        np.testing.assert_array_equal(idx, b_idx)
        np.testing.assert_allclose(dist, b_dist, atol=1e-5)
        np.testing.assert_allclose(w, b_w, atol=1e-5)


def test_bad_arguments(single):
    table, index, queries = single
    with pytest.raises(ValueError):
        index.search(queries, distance="manhattan")
    with pytest.raises(ValueError):
        index.search(queries, top_k=0)
    with pytest.raises(ValueError):
        index.search(queries[:, :10])


class _Sized:
    """Only what choose() reads: a table with ``len(vectors)`` rows (no 100k-row allocation)."""

    def __init__(self, n: int):
        self.vectors = np.empty((n, 0), dtype=np.float32)


def test_choose_switches_at_threshold():
    assert ann.ANN_THRESHOLD == 100_000
    assert ann.choose(_Sized(1)) == "brute"
    assert ann.choose(_Sized(ann.ANN_THRESHOLD)) == "brute"
    assert ann.choose(_Sized(ann.ANN_THRESHOLD + 1)) == "ann"
    assert ann.choose(_Sized(1_000_000)) == "ann"


def test_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, semla.server.ann; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_registry_switches_to_the_index_above_the_threshold(tmp_path, monkeypatch):
    """POST /v1/retrieve answers through the ANN index once the library is large enough."""
    from fastapi.testclient import TestClient

    import bundle_factory
    from semla.registry import keys
    from semla.server import ServerSettings, create_app
    from semla.server import ann as ann_module

    monkeypatch.setattr(ann_module, "ANN_THRESHOLD", 2)
    bundle_factory.install_base_card(tmp_path / "d")
    app = create_app(ServerSettings(data_dir=tmp_path / "d", admin_token="t"))
    with TestClient(app) as client:
        key = keys.generate_key()
        client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()}, headers={"Authorization": "Bearer t"})
        for i in range(4):
            files = bundle_factory.make_bundle_files(tmp_path, key, name=f"a{i}", seed=i)
            assert client.post("/v1/adapters", files={n: (n, d) for n, d in files.items()}).status_code == 201
        query = client.get("/v1/adapters").json()[2]["centroids"][0]
        r = client.post("/v1/retrieve", json={"embedding": query, "base_fingerprint": bundle_factory.FINGERPRINT})
        assert r.status_code == 200 and r.json()["results"][0]["name"] == "a2"
        (entry,) = app.state.service._tables.values()
        assert isinstance(entry.index, ann_module.CentroidIndex)


def test_a_query_of_any_finite_scale_gives_the_unit_query_s_answer(single):
    """Both searches scale a query before normalising it: values near float32's limit (whose
    squares overflow) answer as the unit query does, and an all-zero or infinite one is refused."""
    table, index, queries = single
    q = queries[:4].astype(np.float64)
    for scale in (1e30, 1e-30):
        for search in (index.search, lambda x, **kw: retrieve_numpy(x, table, **kw)):
            want = search(q, top_k=5)
            got = search(q * scale, top_k=5)
            assert np.array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    for bad in (np.zeros_like(q), np.full_like(q, np.inf)):
        with pytest.raises(InvalidInputError):
            index.search(bad, top_k=5)
