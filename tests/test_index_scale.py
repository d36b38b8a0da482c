"""benchmarks/index_scale.py: its bulk fill makes real signed adapters, and a quick run measures
every read endpoint and publishing (the full sizes are run by hand)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from semla.registry import keys
from semla.registry.bundle import verify_bundle
from semla.schemas import BUNDLE_FILES
from semla.server import ServerSettings, create_app
from semla.server.db import library_version

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("index_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["index_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_bulk_fill_makes_a_library_of_verifiable_signed_adapters(bench, tmp_path):
    data = tmp_path / "data"
    lib, fill = bench.bulk_fill("sqlite", f"sqlite:///{data / 'registry.db'}", data, 30, dim=16)
    assert fill["keys"] == 4 and len(lib.names) == 30
    http = TestClient(create_app(ServerSettings(data_dir=data)))
    listing = http.get("/v1/adapters", params={"limit": 1000}).json()
    assert [a["name"] for a in listing] == sorted(lib.names)
    trusted = {keys.key_id(k): keys.public_bytes(k) for k in lib.signers}
    for name in (lib.names[0], lib.names[17]):
        files = {f: http.get(f"/v1/adapters/{name}/1/files/{f}").content for f in BUNDLE_FILES}
        manifest = verify_bundle(files, trusted)  # signature, hashes, tensors: a real bundle
        assert manifest.name == name and manifest.centroids.dim == 16
    with http.app.state.engine.connect() as conn:
        assert library_version(conn) == 4 + 30  # one per key and per adapter
    retrieved = http.post("/v1/retrieve", json={"embedding": listing[3]["centroids"][0],
                                                 "base_fingerprint": listing[3]["base_fingerprint"]})
    assert retrieved.json()["results"][0]["name"] == listing[3]["name"]


@pytest.mark.slow
@pytest.mark.ci_slow  # the scale benchmark's quick mode end to end: fill, reads, publish, a node's TUF sync
def test_quick_run_measures_reads_publishing_and_a_nodes_tuf_sync(bench, tmp_path):
    out = tmp_path / "scale.json"
    assert bench.main(["--quick", "--sizes", "100", "--requests", "16", "--clients", "2", "--publishes", "4",
                       "--refresh-counts", "1,3", "--bulk-above", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert row["backend"] == "sqlite" and row["adapters"] == 100 and row["fill"]["keys"] == 4
    assert row["fill"]["tuf_build_s"] >= 0 and "ensure_repository" in doc["how_filled"]
    read = row["read"]
    for name in ("healthz", *bench.READ_GOAL_ENDPOINTS, "tuf_snapshot_reference"):
        # 16 requests in 4 interleaved rounds of 4 (at least one per client thread)
        assert read[name]["requests"] == 16 and read[name]["req_per_s"] > 0, name
        assert read[name]["server_cpu_ms_per_req"] >= 0, name  # clock ticks: 16 requests may take none
    for name in bench.READ_GOAL_ENDPOINTS:
        assert 0 < read[name]["share_median_of_rounds"] and isinstance(read[name]["meets_goal"], bool), name
    assert "meets_goal" not in read["tuf_snapshot_reference"]
    assert read["listing_page"]["bytes"] > 100 * 64 * 4  # 100 summaries with their 64-d centroids as JSON text
    assert row["publish"]["uploads"] == 4 and 0 < row["publish"]["p50_ms"] <= row["publish"]["p99_ms"]
    sync = row["node_sync"]
    assert list(sync) == list(bench.node_sync_rows((1, 3)))
    cold, one, three = sync["cold_start"], sync["refresh_after_1"], sync["refresh_after_3"]
    assert cold["adapters_listed"] == 100 + 5  # the fill, then 4 timed uploads and a warm-up
    assert cold["bytes"] == sum(cold["bytes_by_kind"].values()) and cold["shard_bytes"] > 0
    assert cold["raw_centroid_bytes"] == 105 * 64 * 4 and cold["payload_over_raw"] > 1
    assert one["adapters_listed"] == 106 and one["bins_changed"] == 1 and one["shard_bytes"] > 0
    assert one["bytes"] < cold["bytes"] and "uploads" in one["added"]["how"]
    assert three["adapters_listed"] == 109 and 1 <= three["bins_changed"] <= 3 and "bulk" in three["added"]["how"]
    assert "INSERT" in doc["how_filled"]  # says how the library was filled


def test_merge_keeps_the_rows_a_run_did_not_measure(bench):
    old = {"command": "first", "results": [{"backend": "sqlite", "adapters": 10, "v": 1},
                                           {"backend": "postgresql", "adapters": 10, "v": 1}]}
    new = {"command": "second", "results": [{"backend": "sqlite", "adapters": 10, "v": 2}]}
    merged = bench._merged(old, new)
    assert merged["command"] == ["first", "second"]
    assert [(r["backend"], r["v"]) for r in merged["results"]] == [("sqlite", 2), ("postgresql", 1)]


def test_sizes_parse(bench):
    assert [bench.parse_size(s) for s in ("10k", "100K", "1M", "2500", "1.5k")] == [10_000, 100_000, 1_000_000,
                                                                                     2500, 1500]
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("lots")


def test_a_killed_run_keeps_what_it_measured(bench, tmp_path, monkeypatch):
    """Each phase is written as it ends (the row marked partial), merged with the rows already there."""
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"command": "before", "results": [{"backend": "postgresql", "adapters": 10}]}))

    def dies(backend, url, n, *, checkpoint, **options):
        checkpoint({"backend": backend, "adapters": n, "fill": {"seconds": 1.0}, "read": {"healthz": {}}})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", dies)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--sizes", "10", "--pg-sizes", "", "--merge", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [(r["backend"], r.get("partial")) for r in doc["results"]] == [("sqlite", True), ("postgresql", None)]
    assert doc["results"][0]["read"] == {"healthz": {}} and doc["command"][0] == "before"


def test_reuse_refuses_a_data_dir_this_benchmark_did_not_fill(bench, tmp_path):
    from semla.server.db import upgrade

    upgrade(f"sqlite:///{tmp_path / 'registry.db'}")  # a registry, but no library in it
    with pytest.raises(SystemExit, match="holds no library filled by this benchmark"):
        bench.reused_library(tmp_path, "http://127.0.0.1:9")
