"""Weighting schemes (DESIGN §4): hand-computed weights, numpy == torch, the guard, bad names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semla.registry import weighting
from semla.registry.retrieval import CentroidTable, retrieve_numpy, retrieve_torch
from semla.schemas.errors import InvalidInputError, SemlaError


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _softmax(logits):
    e = [math.exp(x - max(logits)) for x in logits]
    return [x / sum(e) for x in e]


# Three adapters on the axes of R^3; the query's distances to them are known in closed form.
AXES = [[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]
SPREADS = [[0.2, 0.3, 0.5], [0.1, 0.4, 0.6], [0.3, 0.3, 0.4]]  # the third: q90 == q50 → s = 1e-3


def _table(spreads=SPREADS):
    return CentroidTable.from_lists(AXES, spreads)


QUERY = _unit([0.9, 0.4, 0.1])


def _dists():
    return [math.sqrt(2 - 2 * c) for c in QUERY]  # euclidean between unit vectors


def test_neg_distance_by_hand():
    d = _dists()
    idx, dist, w = retrieve_numpy(QUERY[None], _table(), top_k=3, weighting="neg-distance", temperature=0.1)
    order = sorted(range(3), key=lambda i: d[i])
    assert idx[0].tolist() == order
    assert np.allclose(dist[0], [d[i] for i in order], atol=1e-6)
    assert np.allclose(w[0], _softmax([-d[i] / 0.1 for i in order]), atol=1e-6)


def test_paper_by_hand_and_zero_distance():
    d = _dists()
    order = sorted(range(3), key=lambda i: d[i])
    _, _, w = retrieve_numpy(QUERY[None], _table(), top_k=2, weighting="paper", temperature=0.5)
    assert np.allclose(w[0], _softmax([(1 / d[i]) / 0.5 for i in order[:2]]), atol=1e-5)
    # a query on a centroid: d = 0 is clamped, the weight finite and (all but) one-hot
    _, dist, w = retrieve_numpy(np.array([[0.0, 1.0, 0.0]]), _table(), top_k=3, weighting="paper")
    assert dist[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(w).all() and w[0, 0] == pytest.approx(1.0)


def test_calibrated_by_hand():
    d = _dists()
    order = sorted(range(3), key=lambda i: d[i])
    u = float(np.median([q50 for q50, _, _ in SPREADS]))  # the library's unit: 0.2
    logits = [-(d[i] / u) / 0.5 for i in order]
    _, _, w = retrieve_numpy(QUERY[None], _table(), top_k=3)  # the default scheme and its T
    assert weighting.DEFAULT_WEIGHTING == "calibrated"
    assert np.allclose(w[0], _softmax(logits), atol=1e-5)
    assert w[0].sum() == pytest.approx(1.0, abs=1e-6)


def test_calibrated_is_scale_free():
    """Scaling distances and spreads together leaves the weights unchanged (z is a ratio)."""
    dist = np.array([[0.3, 0.5, 0.9]])
    idx = np.array([[0, 1, 2]])
    spread = np.array(SPREADS)
    a = weighting.weights_numpy(dist, idx, spread)
    b = weighting.weights_numpy(dist * 7.0, idx, spread * 7.0)
    assert np.allclose(a, b, atol=1e-9)
    # neg-distance is not: the same scaling sharpens it
    c = weighting.weights_numpy(dist, idx, spread, weighting="neg-distance")
    e = weighting.weights_numpy(dist * 7.0, idx, spread * 7.0, weighting="neg-distance")
    assert not np.allclose(c, e, atol=1e-3)


@pytest.mark.parametrize("scheme", weighting.list_weightings())
@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_numpy_equals_torch(scheme, guard, distance):
    rng = np.random.default_rng(3)
    cents = [[_unit(rng.normal(size=16)) for _ in range(1 + i % 3)] for i in range(7)]
    spreads = [None if i == 2 else sorted(rng.uniform(0.2, 0.9, size=3)) for i in range(7)]
    table = CentroidTable.from_lists(cents, spreads)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    a = retrieve_numpy(q, table, top_k=4, weighting=scheme, guard=guard, distance=distance)
    b = retrieve_torch(torch.from_numpy(q), table, top_k=4, weighting=scheme, guard=guard, distance=distance)
    assert np.array_equal(a[0], b[0].numpy())
    assert np.allclose(a[1], b[1].numpy(), atol=1e-5)
    assert np.allclose(a[2], b[2].numpy(), atol=1e-4)
    sums = a[2].sum(axis=1)
    if guard:
        assert (sums < 1.0).all() and (sums > 0.0).all()
    else:
        assert np.allclose(sums, 1.0, atol=1e-5)


def test_guard_far_query_gives_the_base_most_weight():
    rng = np.random.default_rng(0)
    cents = [[_unit(rng.normal(size=32))] for _ in range(5)]
    table = CentroidTable.from_lists(cents, [[0.3, 0.35, 0.45]] * 5)
    far = -np.sum([c[0] for c in cents], axis=0)[None]  # away from every centroid
    for scheme in weighting.list_weightings():
        _, dist, w = retrieve_numpy(far, table, top_k=3, weighting=scheme, guard=True)
        assert (dist > 0.9).all()
        base = 1.0 - w.sum()
        if scheme == "calibrated":
            assert base > 0.9
        assert weighting.base_weight_of(w)[0] == pytest.approx(base, abs=1e-6)
    _, _, w = retrieve_numpy(far, table, top_k=3, guard=True)
    assert 1.0 - w.sum() > 0.9


def test_guard_at_a_centroid_gives_the_base_almost_nothing():
    rng = np.random.default_rng(1)
    cents = [[_unit(rng.normal(size=32))] for _ in range(5)]
    table = CentroidTable.from_lists(cents, [[0.3, 0.35, 0.45]] * 5)
    at = np.asarray(cents[2][0])[None]
    idx, _, w = retrieve_numpy(at, table, top_k=3, guard=True)
    assert idx[0, 0] == 2
    g = weighting.default_guard_z(table.spreads)
    assert g == pytest.approx(0.45 / 0.3 + 1.0)  # median q99 over the unit u = median q50, plus one unit
    base = 1.0 - w.sum()
    assert base < 0.01
    d1 = np.linalg.norm(np.asarray(cents[2][0]) - at[0])  # ~0: the query is the centroid
    assert base == pytest.approx(1.0 / (1.0 + math.exp(g / 0.5 - (d1 / 0.3) / 0.5)), rel=1e-3)
    # the guard only adds the base: the adapters keep their weights relative to each other
    _, _, plain = retrieve_numpy(at, table, top_k=3)
    assert np.allclose(w / w.sum(), plain, atol=1e-5)


def test_guard_weighs_the_base_against_the_nearest_adapter_whatever_k():
    """The base's weight is sigmoid(l_base - l_nearest): the same for the top-1 and the top-5, so a
    query no adapter covers is not diluted by many soft candidates; the adapters share the rest."""
    table = _table()
    for scheme in weighting.list_weightings():
        weights = {k: retrieve_numpy(QUERY[None], table, top_k=k, weighting=scheme, guard=True, temperature=
                                     None if scheme != "calibrated" else 4.0)[2] for k in (1, 2, 3)}
        bases = [1.0 - w.sum() for w in weights.values()]
        assert bases == pytest.approx([bases[0]] * 3, abs=1e-6) and 0.0 <= bases[0] < 1.0
        assert bases[0] > 0.01 or scheme != "calibrated"  # paper/neg-distance on unit vectors: ~0
        plain = retrieve_numpy(QUERY[None], table, top_k=3, weighting=scheme, temperature=
                               None if scheme != "calibrated" else 4.0)[2]
        assert np.allclose(weights[3], plain * (1.0 - bases[0]), atol=1e-6)


def test_explicit_guard_z_moves_the_base():
    table = _table()
    lo = retrieve_numpy(QUERY[None], table, top_k=3, guard=True, guard_z=0.0)[2].sum()
    hi = retrieve_numpy(QUERY[None], table, top_k=3, guard=True, guard_z=5.0)[2].sum()
    assert lo < hi < 1.0  # the base further out keeps less weight


def test_v1_default_spread():
    """Version-1 rows get the median of the published rows; with none, the centroids' geometry."""
    table = CentroidTable.from_lists(AXES, [None, [0.1, 0.2, 0.3], [0.3, 0.4, 0.7]])
    assert np.allclose(table.spreads[0], [0.2, 0.3, 0.5])
    assert table.spread_known.tolist() == [False, True, True]
    bare = CentroidTable.from_lists(AXES)  # no spreads at all: distance between axes is sqrt(2)
    assert np.allclose(bare.spreads, [[0.5 * math.sqrt(2), 0.75 * math.sqrt(2), math.sqrt(2)]] * 3)
    one = CentroidTable.from_lists(AXES[:1])
    assert np.allclose(one.spreads, [[0.5, 0.75, 1.0]])


@pytest.mark.parametrize("bad", ["softmax", "", "CALIBRATED", None, 3])
def test_unknown_scheme_is_refused_with_the_valid_names(bad):
    with pytest.raises(InvalidInputError) as err:
        retrieve_numpy(QUERY[None], _table(), weighting=bad)
    assert isinstance(err.value, SemlaError)
    for name in ("calibrated", "neg-distance", "paper"):
        assert name in str(err.value)
    with pytest.raises(InvalidInputError):
        retrieve_torch(torch.from_numpy(QUERY[None].astype(np.float32)), _table(), weighting=bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 1e4, True])
def test_bad_guard_z_is_refused(bad):
    with pytest.raises(InvalidInputError):
        retrieve_numpy(QUERY[None], _table(), guard=True, guard_z=bad)


def test_weighting_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, semla.registry.weighting, semla.registry.retrieval; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the registry: manifests of schema 1 and 2, POST /v1/retrieve ---------------------------------
def _v2(q50, q90, q99, count=64):
    return {"schema_version": 2, "spread": {"q50": q50, "q90": q90, "q99": q99, "count": count}}


@pytest.fixture()
def registry(tmp_path):
    import bundle_factory
    from fastapi.testclient import TestClient

    from semla.registry import keys
    from semla.server import ServerSettings, create_app

    bundle_factory.install_base_card(tmp_path / "data")
    with TestClient(create_app(ServerSettings(data_dir=tmp_path / "data", admin_token="t"))) as client:
        key = keys.generate_key()
        r = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
                        headers={"Authorization": "Bearer t"})
        assert r.status_code == 201, r.text
        yield client, key


def _upload(client, files):
    return client.post("/v1/adapters", files={n: (n, d, "application/octet-stream") for n, d in files.items()})


def test_v1_and_v2_manifests_publish_and_list_their_spread(registry, tmp_path):
    import json

    import bundle_factory

    from semla.schemas import MANIFEST_FILE, Manifest

    client, key = registry
    old = bundle_factory.make_bundle_files(tmp_path, key, name="old", seed=1)
    new = bundle_factory.make_bundle_files(tmp_path, key, name="new", seed=2, **_v2(0.2, 0.3, 0.45))
    assert b"spread" not in old[MANIFEST_FILE] and json.loads(old[MANIFEST_FILE])["schema_version"] == 1
    assert Manifest.parse(new[MANIFEST_FILE]).spread.quantiles == (0.2, 0.3, 0.45)
    for files in (old, new):
        assert _upload(client, files).status_code == 201
    listing = {a["name"]: a for a in client.get("/v1/adapters").json()}
    assert "spread" not in listing["old"]  # the schema-1 listing keeps its exact shape
    assert listing["new"]["spread"] == [0.2, 0.3, 0.45]


def test_a_v2_manifest_without_spread_or_v1_with_one_is_refused(registry, tmp_path):
    import bundle_factory

    client, key = registry
    ok = bundle_factory.make_bundle_files(tmp_path, key, name="x", **_v2(0.2, 0.3, 0.4))
    for edit in ({"schema_version": 1}, {"spread": None}, {"spread": {"q50": 0.5, "q90": 0.3, "q99": 0.4, "count": 1}},
                 {"schema_version": 3}, {"spread": {"q50": 0.1, "q90": 0.3, "q99": 2.5, "count": 1}}):
        files = bundle_factory.edit_manifest(ok, lambda raw, edit=edit: raw.update(edit), resign_with=key)
        r = _upload(client, files)
        assert 400 <= r.status_code < 500, (edit, r.text)
        assert r.json()["error"]["code"] == "manifest_invalid", r.text
    assert _upload(client, ok).status_code == 201


def test_retrieve_weighting_guard_and_base_weight(registry, tmp_path):
    import bundle_factory

    client, key = registry
    for i in range(3):
        assert _upload(client, bundle_factory.make_bundle_files(
            tmp_path, key, name=f"a{i}", seed=i, **_v2(0.2, 0.25, 0.35))).status_code == 201
    listing = client.get("/v1/adapters").json()
    at = listing[0]["centroids"][0]
    body = {"embedding": at, "base_fingerprint": bundle_factory.FINGERPRINT}
    plain = client.post("/v1/retrieve", json=body).json()
    assert plain["weighting"] == "calibrated" and plain["base_weight"] == 0.0
    assert sum(x["weight"] for x in plain["results"]) == pytest.approx(1.0, abs=1e-6)

    guarded = client.post("/v1/retrieve", json={**body, "guard": True}).json()
    assert guarded["results"][0]["name"] == listing[0]["name"]
    assert 0.0 < guarded["base_weight"] < 0.05  # at a centroid the base gets almost nothing
    assert sum(x["weight"] for x in guarded["results"]) + guarded["base_weight"] == pytest.approx(1.0, abs=1e-6)

    far = [-x for x in at]
    away = client.post("/v1/retrieve", json={**body, "embedding": far, "guard": True}).json()
    assert away["base_weight"] > 0.9  # nothing in the library covers it

    for scheme in ("paper", "neg-distance"):
        r = client.post("/v1/retrieve", json={**body, "weighting": scheme})
        assert r.status_code == 200 and r.json()["weighting"] == scheme

    r = client.post("/v1/retrieve", json={**body, "weighting": "softmax"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_weighting"
    assert "calibrated" in r.json()["error"]["message"]
    for bad in ({"guard_z": -1}, {"guard_z": 1e9}, {"guard": "maybe"}, {"weighting": ""}, {"weighting": "x" * 65},
                {"temperature": 0}):
        r = client.post("/v1/retrieve", json={**body, **bad})
        assert r.status_code == 422, (bad, r.text)
