"""Prometheus metrics and JSON logs: scrape the registry and the node service after real
traffic and check that each counter moved by what that traffic implies."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bundle_factory
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_server import assert_error, make_client, register, upload
from tuf_view import snapshot_version

from semla.registry import keys
from semla.registry.logs import JsonFormatter, resolve_log_format, uvicorn_log_config
from semla.schemas.errors import InvalidInputError
from semla.server.db import library_version

BIN_DIR = Path(sys.executable).parent
TOKEN = "metrics-test-token"
CLASSES = "sky,road,sidewalk,building,vegetation,car,person,pole"

Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient | httpx.Client, url: str = "") -> Samples:
    """Every sample of ``GET /metrics``, keyed by (sample name, frozenset of label items)."""
    response = client.get(url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def dp(epsilon: float) -> dict:
    return {"privacy": {"mechanism": "gaussian", "epsilon": epsilon, "delta": 1e-5, "clip_norm": 1.0,
                        "min_samples": 50}}


# -- registry -------------------------------------------------------------------------------------
def test_registry_counts_requests_per_route_template_and_uploads_by_code(tmp_path):
    with make_client(tmp_path / "data") as client:
        key = keys.generate_key()
        register(client, key)
        before = scrape(client)
        first = upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="city-streets", version=1,
                                                               **dp(1.5)))
        again = upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="city-streets", version=1))
        assert first.status_code == 201, first.text
        assert_error(again, 409, "stale_version")
        assert client.get("/v1/adapters/city-streets").status_code == 200
        assert client.get("/v1/adapters/no-such-adapter").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        with client.app.state.engine.connect() as conn:
            index_version = library_version(conn)  # the library counter
        assert snapshot_version(client) > 1  # nodes see the change in the TUF metadata
        after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("semla_registry_uploads_accepted_total") == 1
    assert moved("semla_registry_uploads_refused_total", code="stale_version") == 1
    assert sum(v for (n, _), v in after.items() if n == "semla_registry_uploads_refused_total") == 1
    requests = "semla_registry_http_requests_total"
    assert moved(requests, route="/v1/adapters", method="POST", status="201") == 1
    assert moved(requests, route="/v1/adapters", method="POST", status="409") == 1
    assert moved(requests, route="/v1/adapters/{name}", method="GET", status="200") == 1
    assert moved(requests, route="/v1/adapters/{name}", method="GET", status="404") == 1
    assert moved(requests, route="<unmatched>", method="GET", status="404") == 1
    assert moved("semla_registry_http_request_duration_seconds_count", route="/v1/adapters", method="POST") == 2
    routes = {dict(labels)["route"] for (n, labels), _ in after.items() if n == requests}
    assert not any("city-streets" in r or "no/such" in r for r in routes), routes  # templates, not raw paths
    assert value(after, "semla_registry_library_adapters") == 1
    assert value(after, "semla_registry_adapter_versions") == 1
    assert value(after, "semla_registry_index_version") == index_version > value(before, "semla_registry_index_version")
    assert value(after, "semla_registry_epsilon_spent", key_id=keys.key_id(key)) == pytest.approx(1.5)
    assert value(after, "semla_registry_epsilon_budget") == 10.0
    assert value(after, "semla_registry_db_up") == 1
    assert value(after, "semla_registry_db_pool_checked_out") == 0  # the scrape's own connection went back
    assert ("semla_registry_db_pool_size", frozenset()) in after


def test_refusals_before_the_service_are_counted_by_their_code(tmp_path):
    with make_client(tmp_path / "data", max_upload_bytes=1000) as client:
        too_big = client.post("/v1/adapters", files={"x": ("x", b"0" * 2000, "application/octet-stream")})
        not_form = client.post("/v1/adapters", content=b"{}", headers={"content-type": "application/json"})
        samples = scrape(client)
    assert too_big.status_code == 413 and not_form.status_code == 400
    assert value(samples, "semla_registry_uploads_refused_total", code="too_large") == 1
    assert value(samples, "semla_registry_uploads_refused_total", code="invalid_form") == 1
    assert value(samples, "semla_registry_uploads_accepted_total") == 0


def test_epsilon_series_are_bounded(tmp_path, monkeypatch):
    from semla.server import metrics

    monkeypatch.setattr(metrics, "MAX_KEY_SERIES", 1)
    with make_client(tmp_path / "data") as client:
        big, small = keys.generate_key(), keys.generate_key()
        for key, name, eps in ((big, "big-spender", 3.0), (small, "small-spender", 0.5)):
            register(client, key)
            files = bundle_factory.make_bundle_files(tmp_path, key, name=name, version=1, **dp(eps))
            assert upload(client, files).status_code == 201
        samples = scrape(client)
    spent = {dict(labels)["key_id"]: v for (n, labels), v in samples.items() if n == "semla_registry_epsilon_spent"}
    assert spent == {keys.key_id(big): pytest.approx(3.0), "_other": pytest.approx(0.5)}


def test_database_gauges_are_reused_briefly_unless_this_replica_wrote(tmp_path, monkeypatch):
    from semla.schemas import KeyCreate
    from semla.server import metrics

    monkeypatch.setattr(metrics, "DB_READ_SECONDS", 3600.0)
    with make_client(tmp_path / "data") as client:
        first = value(scrape(client), "semla_registry_index_version")
        # a change this replica's HTTP API did not make (another replica's, say): not seen at once
        client.app.state.service.register_key(KeyCreate(public_key=keys.public_bytes(keys.generate_key()).hex()))
        assert value(scrape(client), "semla_registry_index_version") == first
        monkeypatch.setattr(metrics, "DB_READ_SECONDS", 0.0)
        second = value(scrape(client), "semla_registry_index_version")
        assert second > first
        monkeypatch.setattr(metrics, "DB_READ_SECONDS", 3600.0)
        scrape(client)
        register(client, keys.generate_key())  # through the API: the next scrape reads again
        assert value(scrape(client), "semla_registry_index_version") > second


def test_a_database_read_that_overlaps_a_change_here_is_not_reused(tmp_path, monkeypatch):
    """A scrape reading while this replica commits a change may read what was there before it:
    that read is answered but not kept, so the next scrape reads again."""
    from semla.schemas import KeyCreate
    from semla.server import metrics

    monkeypatch.setattr(metrics, "DB_READ_SECONDS", 3600.0)
    with make_client(tmp_path / "data") as client:
        collector = metrics.LibraryCollector(client.app.state.engine, None)
        connect = collector.engine.connect

        def connect_while_a_change_commits():
            collector.invalidate()
            return connect()

        monkeypatch.setattr(collector.engine, "connect", connect_while_a_change_commits)
        (_, _, first, _), _ = collector._query()
        monkeypatch.setattr(collector.engine, "connect", connect)
        client.app.state.service.register_key(KeyCreate(public_key=keys.public_bytes(keys.generate_key()).hex()))
        (_, _, second, _), _ = collector._query()
        assert second > first


def test_each_app_has_its_own_registry_and_metrics_can_be_turned_off(tmp_path):
    with make_client(tmp_path / "a") as one, make_client(tmp_path / "b") as two, \
            make_client(tmp_path / "c", metrics=False) as off:
        for _ in range(3):
            one.get("/healthz")
        two.get("/healthz")
        off.get("/healthz")
        healthz = dict(route="/healthz", method="GET", status="200")
        assert value(scrape(one), "semla_registry_http_requests_total", **healthz) == 3
        assert value(scrape(two), "semla_registry_http_requests_total", **healthz) == 1
        assert_error(off.get("/metrics"), 404, "not_found")


# -- node service ---------------------------------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _second_adapter(trained: Path, out: Path) -> Path:
    """The fog bundle under another name and a nearby centroid: images get per-image mixtures."""
    shutil.copytree(trained, out)
    manifest = json.loads((out / "manifest.json").read_text())
    vec = np.asarray(manifest["centroids"]["vectors"][0])
    vec = vec + 0.3 * np.random.default_rng(0).standard_normal(vec.shape) / np.sqrt(vec.size)
    manifest["name"] = "fog-b"
    manifest["centroids"]["vectors"] = [(vec / np.linalg.norm(vec)).tolist()]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "manifest.sig").unlink(missing_ok=True)
    return out


def test_node_counts_requests_images_batches_paths_and_cache(tmp_path, tiny_base, trained_bundle):
    from semla.client.publish import publish_bundle
    from semla.registry import synth
    from semla.registry.http import RegistryClient
    from semla.registry.node import Node
    from semla.registry.serve import ServeSettings, create_app
    from semla.server import ServerSettings
    from semla.server import create_app as create_registry
    from semla.server.local import serve_in_thread

    key = keys.generate_key()
    registry_app = create_registry(ServerSettings(data_dir=tmp_path / "registry", admin_token=TOKEN))
    with serve_in_thread(registry_app) as registry:
        RegistryClient(registry).register_key(keys.public_bytes(key).hex(), TOKEN)
        publish_bundle(shutil.copytree(trained_bundle, tmp_path / "fog"), RegistryClient(registry), key=key)
        publish_bundle(_second_adapter(trained_bundle, tmp_path / "fog-b"), RegistryClient(registry), key=key)
        node = Node(registry, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
        node.pull()  # the index only: no adapter is loaded yet
        app = create_app(node, ServeSettings(max_batch=8, max_wait_ms=50, refresh_seconds=0))
        images = [_png(synth.render(d, 4242, i)[0]) for i in range(3) for d in ("fog", "night")]
        with TestClient(app) as client:
            before = scrape(client)
            sent = [images[:1], images[1:5], images[5:]]  # 1 + 4 + 1 images in three requests
            for chunk in sent:
                files = [("images", (f"{n}.png", data, "image/png")) for n, data in enumerate(chunk)]
                response = client.post("/v1/segment", files=files, data={"classes": CLASSES, "temperature": "1.0"})
                assert response.status_code == 200, response.text
            after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("semla_node_http_requests_total", route="/v1/segment", method="POST", status="200") == 3
    assert moved("semla_node_http_request_duration_seconds_count", route="/v1/segment", method="POST") == 3
    assert moved("semla_node_images_total") == 6
    batches = moved("semla_node_batches_total")
    assert 3 <= batches <= 6  # each request's images share a batch unless the gather window split one
    assert moved("semla_node_batch_size_count") == batches and moved("semla_node_batch_size_sum") == 6
    assert moved("semla_node_queue_wait_seconds_count") == 6
    paths = {p: moved("semla_node_fusion_batches_total", path=p) for p in ("merged", "concat", "gather")}
    assert sum(paths.values()) == batches
    assert paths["merged"] >= 2  # the one-image requests share one weight vector: merged
    assert paths["concat"] + paths["gather"] >= 1  # four different images: per-image mixture
    # the first batch needs both adapters: two misses in memory and on disk (downloads); then hits
    assert moved("semla_node_cache_misses_total", tier="host") == 2
    assert moved("semla_node_cache_misses_total", tier="disk") == 2
    assert moved("semla_node_cache_hits_total", tier="host") == 2 * (batches - 1)
    assert value(after, "semla_node_cache_bytes", tier="host") > 0
    assert value(after, "semla_node_cache_bytes", tier="disk") > 0
    assert value(after, "semla_node_cache_entries", tier="host") == 2
    assert value(after, "semla_node_library_adapters") == 2
    assert value(after, "semla_node_index_version") == node.index_version
    assert value(after, "semla_node_offline") == 0
    assert 0 <= value(after, "semla_node_index_age_seconds") < 600
    assert value(after, "semla_node_queue_depth") == 0 and value(after, "semla_node_worker_alive") == 1


def test_node_reports_refresh_failures_and_offline_state(tmp_path):
    from test_node_serve import FakeNode

    from semla.registry.serve import ServeSettings, create_app

    node = FakeNode()  # its first two pulls fail
    with TestClient(create_app(node, ServeSettings(refresh_seconds=0.02, max_wait_ms=0))) as client:
        deadline = time.monotonic() + 20
        while node.pulls < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        node.offline = True
        samples = scrape(client)
    assert value(samples, "semla_node_index_refresh_failures_total") == 2
    assert value(samples, "semla_node_index_refreshes_total") >= 3
    assert value(samples, "semla_node_offline") == 1


def test_node_metrics_can_be_turned_off(tmp_path):
    from test_node_serve import FakeNode

    from semla.registry.serve import ServeSettings, create_app

    with TestClient(create_app(FakeNode(), ServeSettings(refresh_seconds=0, metrics=False))) as client:
        assert_error(client.get("/metrics"), 404, "not_found")


# -- logs -----------------------------------------------------------------------------------------
def test_json_formatter_writes_one_parsable_object_per_record():
    formatter = JsonFormatter()
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/v1/index", "1.1", 200), None)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = logging.LogRecord("semla.http", logging.ERROR, __file__, 2, "POST %s failed", ("/v1/adapters",),
                                   sys.exc_info())
    lines = [formatter.format(access), formatter.format(failed)]
    assert all("\n" not in line for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert first["logger"] == "uvicorn.access" and first["level"] == "INFO"
    assert (first["method"], first["path"], first["status"], first["client"]) == ("GET", "/v1/index", 200,
                                                                                 "127.0.0.1:5000")
    assert first["message"] == '127.0.0.1:5000 - "GET /v1/index HTTP/1.1" 200'
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["message"] == "POST /v1/adapters failed" and "ValueError: boom" in second["exception"]


def test_log_format_comes_from_the_flag_then_the_environment():
    assert resolve_log_format(None, {}) == "text"
    assert resolve_log_format(None, {"SEMLA_LOG_FORMAT": "JSON"}) == "json"
    assert resolve_log_format("text", {"SEMLA_LOG_FORMAT": "json"}) == "text"
    with pytest.raises(InvalidInputError, match="log format"):
        resolve_log_format(None, {"SEMLA_LOG_FORMAT": "xml"})
    config = uvicorn_log_config("json")
    assert config["formatters"]["access"]["()"] is JsonFormatter and "semla" in config["loggers"]


def test_registry_writes_json_logs_on_loopback(tmp_path, free_port):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SEMLA_")}, "SEMLA_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [str(BIN_DIR / "semla-server"), "--data-dir", str(tmp_path / "d"), "--port", str(free_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    url = f"http://127.0.0.1:{free_port}"
    try:
        from semla.server.local import wait_healthy

        wait_healthy(url, proc, timeout=60)
        assert httpx.get(url + "/v1/adapters/nothing-here").status_code == 404
        assert "semla_registry_http_requests_total" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    access = [json.loads(line) for line in out.splitlines()]
    server = [json.loads(line) for line in err.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(access[0]) and access[0]["logger"] == "uvicorn.access"
    assert any(r["path"] == "/v1/adapters/nothing-here" and r["status"] == 404 for r in access), access
    assert any(r["logger"] == "semla.http" and "not_found" in r["message"] for r in server), server
    assert any(r["logger"].startswith("uvicorn") for r in server)


def test_server_flag_refuses_an_unknown_log_format(tmp_path):
    proc = subprocess.run([str(BIN_DIR / "semla-server"), "--data-dir", str(tmp_path / "d"), "--log-format", "xml"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--log-format" in proc.stderr and "Traceback" not in proc.stderr


def test_node_serve_flags_for_logs_and_metrics():
    from test_node_serve import _parser

    args = _parser().parse_args(["serve", "--registry", "http://127.0.0.1:9"])
    assert args.log_format is None and args.metrics is True
    args = _parser().parse_args(["serve", "--registry", "http://127.0.0.1:9", "--log-format", "json", "--no-metrics"])
    assert args.log_format == "json" and args.metrics is False
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--registry", "http://127.0.0.1:9", "--log-format", "xml"])
