"""The registry's retrieval table, updated with the names changed since its library version,
equals the table read whole; its ANN index, moved along without retraining, answers as a fresh one."""

from __future__ import annotations

import random
import threading

import bundle_factory
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from semla.registry import keys
from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.schemas import revocation_payload
from semla.server import ServerSettings, create_app
from semla.server import ann
from semla.server.db import library_version
from semla.server.service import retrieval as retrieval_service

ADMIN = "admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _register(http: TestClient, key) -> None:
    assert http.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()}, headers=AUTH).status_code == 201


def _upload(http: TestClient, files: dict[str, bytes]) -> httpx.Response:
    return http.post("/v1/adapters", files={n: (n, d, "application/octet-stream") for n, d in files.items()})


def _spread(rng: random.Random) -> dict:
    q50 = rng.uniform(0.1, 0.5)
    return {"schema_version": 2, "spread": {"q50": q50, "q90": q50 * 1.5, "q99": q50 * 2, "count": 64}}


def _whole(app, fingerprint: str) -> retrieval_service.BaseTable:
    """The table read whole from the database now."""
    dim = app.state.service.base_cards.cards()[fingerprint].embedding.dim
    with app.state.service._reads() as conn:
        rows = retrieval_service._newest_rows(conn, fingerprint)
        return retrieval_service.BaseTable.of(library_version(conn), *retrieval_service._parse(rows, dim))


def _assert_same(got: retrieval_service.BaseTable, want: retrieval_service.BaseTable, queries: np.ndarray) -> None:
    assert got.generation == want.generation
    for field in ("names", "versions", "publishers"):
        assert np.array_equal(getattr(got.adapters, field), getattr(want.adapters, field)), field
    assert np.array_equal(got.table.vectors, want.table.vectors) and np.array_equal(got.table.owner, want.table.owner)
    assert np.array_equal(got.table.spread, want.table.spread, equal_nan=True)
    assert (got.index is None) == (want.index is None)
    for weighting in ("calibrated", "paper"):
        search = got.index.search if got.index is not None else lambda q, **kw: retrieve_numpy(q, got.table, **kw)
        fresh = want.index.search if want.index is not None else lambda q, **kw: retrieve_numpy(q, want.table, **kw)
        for a, b in zip(search(queries, top_k=3, weighting=weighting, guard=True),
                        fresh(queries, top_k=3, weighting=weighting, guard=True)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("ann_above", [None, 6], ids=["brute-force", "ann"])
def test_an_updated_table_equals_the_table_read_whole(tmp_path, monkeypatch, ann_above):
    """After each of a random sequence of publishes (new names, new versions, two centroids,
    version-1 and version-2 manifests), version revocations and a key revocation, the table the
    service updated equals the one read whole, and answers every query alike."""
    if ann_above is not None:  # a real multi-list index, every list probed: it answers exactly
        monkeypatch.setattr(ann, "ANN_THRESHOLD", ann_above)
        monkeypatch.setattr(ann, "IVF_CENTROIDS_PER_LIST", 3)
        monkeypatch.setattr(ann, "IVF_NPROBE", 1000)
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    service, fingerprint = app.state.service, bundle_factory.FINGERPRINT
    http, rng = TestClient(app), random.Random(7)
    queries = np.asarray(bundle_factory.unit_vectors(8, bundle_factory.DIM, seed=99))
    publishers = [keys.generate_key() for _ in range(2)]
    for key in publishers:
        _register(http, key)
    owner: dict[str, object] = {}  # name -> its publisher key
    live: dict[str, list[int]] = {}  # name -> its versions not revoked, oldest first
    seen: dict[str, int] = {}  # name -> its highest version published

    def publish(name: str) -> None:
        key = owner.setdefault(name, rng.choice(publishers))
        version = seen.get(name, 0) + 1
        extra = _spread(rng) if rng.random() < 0.5 else {}
        files = bundle_factory.make_bundle_files(tmp_path, key, name=name, version=version, seed=rng.randrange(10**6),
                                                 k=rng.choice([1, 1, 2]), **extra)
        assert _upload(http, files).status_code == 201
        live.setdefault(name, []).append(version)
        seen[name] = version

    def step() -> None:
        service._base_table(fingerprint)  # updates the cached table
        _assert_same(service._tables[fingerprint], _whole(app, fingerprint), queries)

    for i in range(8):
        publish(f"a{i:02d}")
    step()
    updates = 0
    for _ in range(14):
        names = sorted(name for name, versions in live.items() if versions)
        action = rng.random()
        if action < 0.45:
            publish(f"a{rng.randrange(40):02d}")  # a new name, or a new version of a known one
        elif action < 0.6:
            publish(rng.choice(names))
        else:  # revoke the newest live version: the one before it, if any, takes its place
            name = rng.choice(names)
            version = live[name].pop()
            signature = keys.sign(owner[name], revocation_payload(name, version)).hex()
            r = http.post(f"/v1/adapters/{name}/{version}/revoke", json={"signature": signature})
            assert r.status_code == 200, r.text
        before = service._tables[fingerprint]
        step()
        updates += service._tables[fingerprint] is not before
    assert updates == 14
    # A key revocation: every name it signed changes at once.
    revoked = publishers[0]
    assert http.post(f"/v1/keys/{keys.key_id(revoked)}/revoke", headers=AUTH).status_code == 200
    step()
    assert keys.key_id(revoked) not in set(service._tables[fingerprint].adapters.publishers)


def test_an_update_reads_only_the_changed_names(tmp_path, monkeypatch):
    """One publish into a cached table reads that one name, not the library."""
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    http, key = TestClient(app), keys.generate_key()
    _register(http, key)
    for i in range(5):
        assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name=f"n{i}", seed=i)).status_code == 201
    service = app.state.service
    service._base_table(bundle_factory.FINGERPRINT)
    read: list = []
    real = retrieval_service._newest_rows
    monkeypatch.setattr(retrieval_service, "_newest_rows", lambda conn, fp, names=None: read.append(names) or real(conn, fp, names))
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="n9", seed=9)).status_code == 201
    assert len(service._base_table(bundle_factory.FINGERPRINT).adapters.names) == 6
    assert read == [["n9"]]


def test_the_table_orders_names_itself_whatever_order_the_database_returns(tmp_path, monkeypatch):
    """A database collation may order names otherwise than Python (en_US ignores '-' and '.'):
    the table sorts them itself, so an update finds each name where it searches for it."""
    real = retrieval_service._plain_rows
    monkeypatch.setattr(retrieval_service, "_plain_rows", lambda *args, **kw: real(*args, **kw)[::-1])
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    http, key = TestClient(app), keys.generate_key()
    _register(http, key)
    names = ["a-b", "a.c", "ab", "a_d", "a0"]
    for i, name in enumerate(names):
        assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name=name, seed=i)).status_code == 201
    service = app.state.service
    service._base_table(bundle_factory.FINGERPRINT)
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="a.c", version=2, seed=9)).status_code == 201
    r = http.post("/v1/adapters/ab/1/revoke", json={"signature": keys.sign(key, revocation_payload("ab", 1)).hex()})
    assert r.status_code == 200, r.text
    got = service._base_table(bundle_factory.FINGERPRINT)
    assert got.adapters.names.tolist() == sorted(set(names) - {"ab"}) and got.adapters.versions.tolist() == [1, 2, 1, 1]
    _assert_same(got, _whole(app, bundle_factory.FINGERPRINT), np.asarray(bundle_factory.unit_vectors(4, bundle_factory.DIM, seed=5)))


def test_concurrent_requests_after_a_change_update_the_table_once(tmp_path, monkeypatch):
    """Requests that find the library changed wait for the one updating the table and use its
    table, instead of each reading the library."""
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    http, key = TestClient(app), keys.generate_key()
    _register(http, key)
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="one", seed=1)).status_code == 201
    service = app.state.service
    second = threading.Event()
    updates: list[int] = []
    real = type(service)._updated

    def slow_update(self, *args):
        updates.append(1)
        if len(updates) > 1:
            second.set()
        else:  # hold the first update until a second one starts (none does, with the lock), or 1.5 s
            second.wait(timeout=1.5)
        return real(self, *args)

    monkeypatch.setattr(type(service), "_updated", slow_update)
    tables: list = []
    threads = [threading.Thread(target=lambda: tables.append(service._base_table(bundle_factory.FINGERPRINT)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(updates) == 1 and len(tables) == 4 and all(t is tables[0] for t in tables)


def _retrieved(http: TestClient) -> set[str]:
    body = {"embedding": bundle_factory.unit_vectors(1, bundle_factory.DIM, seed=3)[0],
            "base_fingerprint": bundle_factory.FINGERPRINT, "top_k": 100}
    r = http.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    return {row["name"] for row in r.json()["results"]}


def test_retrieval_rereads_the_library_version_after_recheck_s_and_after_a_change_made_here(tmp_path, monkeypatch):
    """Two replicas on one database: a replica's retrieval sees its own publish at once, and
    another's only once ``retrieval_recheck_s`` has passed (until then it reads no library version)."""
    from semla.server import db

    clock = [1000.0]
    monkeypatch.setattr(db, "monotonic", lambda: clock[0])
    bundle_factory.install_base_card(tmp_path / "data")
    settings = ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN, retrieval_recheck_s=30)
    here, there = TestClient(create_app(settings)), TestClient(create_app(settings))
    key = keys.generate_key()
    _register(here, key)
    assert _upload(here, bundle_factory.make_bundle_files(tmp_path, key, name="one", seed=1)).status_code == 201
    assert _retrieved(here) == {"one"}
    assert _upload(here, bundle_factory.make_bundle_files(tmp_path, key, name="two", seed=2)).status_code == 201
    assert _retrieved(here) == {"one", "two"}  # its own change: at once
    assert _upload(there, bundle_factory.make_bundle_files(tmp_path, key, name="three", seed=3)).status_code == 201
    clock[0] += 29
    assert _retrieved(here) == {"one", "two"}  # another replica's: not yet
    clock[0] += 2
    assert _retrieved(here) == {"one", "two", "three"}
    assert _retrieved(there) == {"one", "two", "three"}


def test_a_version_read_that_overlaps_a_change_made_here_is_not_kept(tmp_path, monkeypatch):
    """A library version read while a change here commits may predate it: the next request
    reads again, so the change is seen at once whatever the interleaving."""
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN, retrieval_recheck_s=60))
    service = app.state.service
    reads = service._reads

    def read_while_a_change_commits():
        service._committed()
        return reads()

    monkeypatch.setattr(service, "_reads", read_while_a_change_commits)
    service._library_version.get()
    assert service._library_version._kept is None
    monkeypatch.setattr(service, "_reads", reads)
    version = service._library_version.get()
    assert service._library_version._kept is not None and service._library_version._kept[1] == version


def _table(rng: np.random.Generator, n: int, dim: int = 8) -> CentroidTable:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return CentroidTable(vectors, np.arange(n, dtype=np.int64), n, np.full((n, 3), np.nan))


def test_a_moved_index_answers_as_one_built_for_its_table():
    """Rows removed and added under fresh ids: every probed answer equals a fresh index's, and
    a table that has doubled since training gets a freshly built index."""
    rng = np.random.default_rng(3)
    old = _table(rng, 60)
    index = ann.CentroidIndex.build(old, nlist=6, nprobe=6)
    kept = rng.random(60) > 0.2
    extra = _table(rng, 15)
    at = np.sort(rng.integers(0, int(kept.sum()) + 1, size=15))
    vectors = np.insert(old.vectors[kept], at, extra.vectors, axis=0)
    new = CentroidTable(vectors, np.arange(len(vectors), dtype=np.int64), len(vectors), np.full((len(vectors), 3), np.nan))
    added = np.insert(np.zeros(int(kept.sum()), dtype=bool), at, True)
    moved = index.updated(new, kept, added)
    assert moved.index.ntotal == len(vectors) and moved.trained_on == 60 and moved.next_id == 75
    queries = rng.normal(size=(20, 8))
    want = ann.CentroidIndex.build(new, nlist=6, nprobe=6).search(queries, top_k=4)
    got = moved.search(queries, top_k=4)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
    assert np.array_equal(got[0], retrieve_numpy(queries, new, top_k=4)[0])
    assert index.index.ntotal == 60  # the old index is untouched: searches on it go on meanwhile
    doubled = _table(rng, 130)
    rebuilt = index.updated(doubled, np.ones(60, dtype=bool), np.r_[np.zeros(60, dtype=bool), np.ones(70, dtype=bool)])
    assert rebuilt.trained_on == 130 and rebuilt.row_of_id is None


@pytest.mark.slow
@pytest.mark.ci_slow  # the benchmark's quick mode end to end: fill, updates, each checked against a read whole
def test_the_retrieval_table_benchmark_runs_quick(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_table.py"
    spec = importlib.util.spec_from_file_location("retrieval_table_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrieval_table_bench"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "retrieval_table.json"
    assert module.main(["--quick", "--workers", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["adapters"] == 500 and row["first_retrieval_reads_whole_ms"] > 0
    assert [c["change"] for c in row["changes"]] == ["1 new adapters", "10 new adapters", "one version revoked",
                                                    "one key revoked"]
    assert all(c["equal_to_read_whole"] for c in row["changes"])
