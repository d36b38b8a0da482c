"""The registry server: HTTP API, verification on upload, storage hygiene, CLI, torch-free import."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bundle_factory
import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select
from tuf_view import tuf_view

from semla.registry import keys
from semla.schemas import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    AdapterSummary,
    KeyPublic,
    UploadReceipt,
)
from semla.server import ServerSettings, create_app
from semla.server.db import Adapter, AdapterFile, Publisher

ADMIN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BIN_DIR = Path(sys.executable).parent


# -- helpers --------------------------------------------------------------------------------------
def make_client(data_dir: Path, **settings) -> TestClient:
    settings.setdefault("admin_token", ADMIN)
    bundle_factory.install_base_card(data_dir)
    app = create_app(ServerSettings(data_dir=data_dir, **settings))
    return TestClient(app)


def register(client: TestClient, key) -> dict:
    resp = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": "test"}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    return resp.json()


def upload(client: TestClient, files: dict[str, bytes]) -> httpx.Response:
    parts = {name: (name, data, "application/octet-stream") for name, data in files.items()}
    return client.post("/v1/adapters", files=parts)


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]


def snapshot(client: TestClient, data_dir: Path) -> dict:
    """Row counts per table and every file under data_dir except the SQLite database, the registry key
    and the base cards (configuration)."""
    with client.app.state.engine.connect() as conn:
        rows = {t.__tablename__: conn.scalar(select(func.count()).select_from(t)) for t in (Publisher, Adapter, AdapterFile)}
    on_disk = sorted(
        str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith(("registry.db", "registry.key"))
        and p.relative_to(data_dir).parts[0] != "bases"
    )
    return {"rows": rows, "files": on_disk, "blobs": [f for f in on_disk if f.startswith("blobs/")]}


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture()
def client(data_dir: Path):
    with make_client(data_dir) as c:
        yield c


@pytest.fixture()
def publisher(client):
    key = keys.generate_key()
    register(client, key)
    return key


@pytest.fixture()
def published(client, publisher, tmp_path):
    """A registry holding city-streets v1 by ``publisher``; returns that bundle's files."""
    files = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=1)
    assert upload(client, files).status_code == 201
    return files


# -- basics ---------------------------------------------------------------------------------------
def test_healthz_docs_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/keys",
        "/v1/adapters",
        "/v1/adapters/{name}",
        "/v1/adapters/{name}/{version}/manifest",
        "/v1/adapters/{name}/{version}/files/{filename}",
    ):
        assert path in paths
    upload_body = paths["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert sorted(upload_body["required"]) == sorted(BUNDLE_FILES)
    assert "ErrorResponse" in json.dumps(paths["/v1/adapters"]["post"]["responses"]["409"])


def test_unknown_route_is_json_error(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/keys"), 405, "method_not_allowed")


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/v1/keys"), ("OPTIONS", "/v1/adapters"), ("PUT", "/healthz")])
def test_405_allow_lists_every_method_of_the_path(client, method, path):
    # GET and POST on one path are two routes; Starlette's 405 named only the first one's
    # methods (``Allow: POST``), found by schemathesis (tests/test_fuzz_api.py).
    resp = client.request(method, path)
    assert_error(resp, 405, "method_not_allowed")
    allowed = {m.strip() for m in resp.headers["allow"].split(",")}
    assert allowed == ({"GET"} if path == "/healthz" else {"GET", "POST"})
    for other in allowed:  # and each one listed really is served there
        assert client.request(other, path).status_code != 405


def test_nothing_created_at_import_or_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ServerSettings()
    assert settings.resolved_database_url == "sqlite:///semla-data/registry.db"
    assert list(tmp_path.iterdir()) == []


def test_settings_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SEMLA_PORT", "9123")
    monkeypatch.setenv("SEMLA_ADMIN_TOKEN", "")
    settings = ServerSettings()
    assert settings.port == 9123 and settings.data_dir == tmp_path / "d"
    assert settings.admin_token is None
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'd' / 'registry.db'}"
    assert "hunter2-secret" not in repr(ServerSettings(admin_token="hunter2-secret"))


def test_server_process_limits_numerical_threads(tmp_path, monkeypatch):
    """semla-server runs each request's BLAS/OpenMP work on SEMLA_COMPUTE_THREADS threads (concurrent
    requests are the parallelism); 0 is refused before anything starts."""
    import threadpoolctl
    import uvicorn

    from semla.server import cli

    seen: list[set[int]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.append(
        {lib["num_threads"] for lib in threadpoolctl.threadpool_info()}))
    monkeypatch.setenv("SEMLA_COMPUTE_THREADS", "1")
    before = threadpoolctl.threadpool_info()
    try:
        assert cli.main(["--data-dir", str(tmp_path / "d")]) == 0
    finally:
        for lib in before:
            threadpoolctl.threadpool_limits(lib["num_threads"], user_api=lib["user_api"])
    assert seen == [{1}]
    monkeypatch.setenv("SEMLA_COMPUTE_THREADS", "0")
    with pytest.raises(ValidationError):
        ServerSettings()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(client):
    with client.app.state.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# -- keys -----------------------------------------------------------------------------------------
def test_key_registration_needs_the_admin_token(client):
    body = {"public_key": keys.public_bytes(keys.generate_key()).hex()}
    assert_error(client.post("/v1/keys", json=body), 401, "unauthorized")
    assert_error(client.post("/v1/keys", json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(client.post("/v1/keys", json=body, headers={"Authorization": f"Basic {ADMIN}"}), 401, "unauthorized")
    assert client.get("/v1/keys").json() == []


def test_key_registration_and_duplicate(client):
    key = keys.generate_key()
    created = KeyPublic.model_validate(register(client, key))
    assert created.key_id == keys.key_id(key) and created.active and created.label == "test"
    assert created.created_at.endswith("Z")
    again = client.post("/v1/keys", json={"public_key": created.public_key}, headers=AUTH)
    assert_error(again, 409, "key_exists")
    assert [KeyPublic.model_validate(k) for k in client.get("/v1/keys").json()] == [created]


def test_key_registration_validates_the_body(client):
    assert_error(client.post("/v1/keys", json={"public_key": "zz"}, headers=AUTH), 422, "invalid_request")
    assert_error(client.post("/v1/keys", json={"public_key": "00" * 32, "x": 1}, headers=AUTH), 422, "invalid_request")


def test_admin_endpoints_disabled_without_token(tmp_path):
    with make_client(tmp_path / "d", admin_token=None) as c:
        body = {"public_key": keys.public_bytes(keys.generate_key()).hex()}
        assert_error(c.post("/v1/keys", json=body, headers=AUTH), 503, "admin_disabled")


# -- publishing and reading -----------------------------------------------------------------------
def test_upload_then_list_and_fetch_round_trip(client, publisher, tmp_path):
    files = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=1, domain="urban streets")
    resp = upload(client, files)
    assert resp.status_code == 201, resp.text
    receipt = UploadReceipt.model_validate(resp.json())
    manifest_sha = hashlib.sha256(files[MANIFEST_FILE]).hexdigest()
    assert receipt == UploadReceipt(name="city-streets", version=1, publisher=keys.key_id(publisher), manifest_sha256=manifest_sha)

    [summary] = [AdapterSummary.model_validate(a) for a in client.get("/v1/adapters").json()]
    manifest = json.loads(files[MANIFEST_FILE])
    assert summary.name == "city-streets" and summary.version == 1
    assert summary.publisher == keys.key_id(publisher)
    assert summary.base_fingerprint == bundle_factory.FINGERPRINT
    assert summary.domain == "urban streets" and summary.sample_count == manifest["sample_count"]
    assert summary.manifest_sha256 == manifest_sha
    assert summary.centroids == manifest["centroids"]["vectors"]  # exact floats, for local retrieval

    got = client.get("/v1/adapters/city-streets/1/manifest")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert got.content == files[MANIFEST_FILE]
    for name in BUNDLE_FILES:
        got = client.get(f"/v1/adapters/city-streets/1/files/{name}")
        assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
        assert got.content == files[name], name


def test_listing_shows_newest_version_per_name_and_filters(client, publisher, tmp_path):
    for name, version, domain in [("city-streets", 1, "urban"), ("city-streets", 2, "urban night"), ("forest", 1, "Woodland trails")]:
        files = bundle_factory.make_bundle_files(tmp_path, publisher, name=name, version=version, domain=domain, seed=version)
        assert upload(client, files).status_code == 201

    listed = {a["name"]: a["version"] for a in client.get("/v1/adapters").json()}
    assert listed == {"city-streets": 2, "forest": 1}
    assert [a["name"] for a in client.get("/v1/adapters", params={"domain": "woodland"}).json()] == ["forest"]
    assert [a["version"] for a in client.get("/v1/adapters", params={"name": "city-streets"}).json()] == [2]
    assert client.get("/v1/adapters", params={"domain": "%"}).json() == []  # LIKE wildcards are escaped
    versions = client.get("/v1/adapters/city-streets").json()
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["domain"] == "urban night"
    assert_error(client.get("/v1/adapters/no-such-adapter"), 404, "not_found")
    assert_error(client.get("/v1/adapters/city-streets/3/manifest"), 404, "not_found")


def test_identical_files_are_stored_once(client, publisher, tmp_path, data_dir):
    one = bundle_factory.make_bundle_files(tmp_path, publisher, name="a-one", version=1)
    two = bundle_factory.make_bundle_files(tmp_path, publisher, name="a-two", version=1)
    assert one[ADAPTER_CONFIG_FILE] == two[ADAPTER_CONFIG_FILE]
    assert one[ADAPTER_WEIGHTS_FILE] == two[ADAPTER_WEIGHTS_FILE]
    assert upload(client, one).status_code == 201
    assert upload(client, two).status_code == 201
    # two manifests + two signatures + one shared weights file + one shared config
    assert len(snapshot(client, data_dir)["blobs"]) == 6


# -- every refusal has its own code and leaves nothing behind ----------------------------------------
def _pickle_payload() -> bytes:
    return pickle.dumps({"base_model.model.x.lora_A.weight": [[1.0, 2.0]]})


TAMPERS = {
    # id: (make bad files from (published files, publisher key, other key, tmp_path), status, code)
    "weight_byte_flipped": (lambda f, k, o, t: bundle_factory.flip_byte(f), 422, "hash_mismatch"),
    "config_byte_flipped": (lambda f, k, o, t: bundle_factory.flip_byte(f, ADAPTER_CONFIG_FILE, 0), 422, "hash_mismatch"),
    "centroid_changed_not_resigned": (
        lambda f, k, o, t: bundle_factory.edit_manifest(
            f, lambda m: m.update(version=2, centroids={**m["centroids"], "vectors": bundle_factory.unit_vectors(seed=7)})
        ),
        403,
        "bad_signature",
    ),
    "signature_truncated": (lambda f, k, o, t: {**f, SIGNATURE_FILE: f[SIGNATURE_FILE][:10]}, 403, "bad_signature"),
    "unregistered_key": (
        lambda f, k, o, t: bundle_factory.make_bundle_files(t, keys.generate_key(), name="other-name"),
        403,
        "unknown_key",
    ),
    "replayed_same_version": (lambda f, k, o, t: dict(f), 409, "stale_version"),
    "name_of_another_publisher": (
        lambda f, k, o, t: bundle_factory.make_bundle_files(t, o, name="city-streets", version=5, seed=3),
        409,
        "name_taken",
    ),
    "pickle_posing_as_safetensors": (
        lambda f, k, o, t: bundle_factory.edit_manifest(
            bundle_factory.replace_file(f, ADAPTER_WEIGHTS_FILE, _pickle_payload(), key=k),
            lambda m: m.update(version=2),
            resign_with=k,
        ),
        422,
        "tensor_format",
    ),
    "missing_file": (lambda f, k, o, t: {n: d for n, d in f.items() if n != SIGNATURE_FILE}, 422, "missing_file"),
    "extra_file": (lambda f, k, o, t: {**f, "model.pkl": _pickle_payload()}, 422, "extra_file"),
    "unknown_manifest_field_resigned": (
        lambda f, k, o, t: bundle_factory.edit_manifest(f, lambda m: m.update(version=2, note="hi"), resign_with=k),
        422,
        "manifest_invalid",
    ),
    "manifest_not_canonical": (
        lambda f, k, o, t: {
            **bundle_factory.edit_manifest(f, lambda m: m.update(version=2), resign_with=k),
            MANIFEST_FILE: json.dumps(
                json.loads(bundle_factory.edit_manifest(f, lambda m: m.update(version=2))[MANIFEST_FILE]), indent=2
            ).encode(),
        },
        422,
        "manifest_not_canonical",
    ),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_upload_is_refused_and_leaves_nothing(tamper, client, publisher, published, tmp_path, data_dir):
    make_bad, status, code = TAMPERS[tamper]
    other = keys.generate_key()
    register(client, other)
    bad = make_bad(published, publisher, other, tmp_path / "t")
    before = snapshot(client, data_dir)

    assert_error(upload(client, bad), status, code)

    assert snapshot(client, data_dir) == before
    assert [a["version"] for a in client.get("/v1/adapters/city-streets").json()] == [1]


def test_lower_version_is_stale(client, publisher, tmp_path, data_dir):
    for version in (1, 3):
        files = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=version, seed=version)
        assert upload(client, files).status_code == 201
    before = snapshot(client, data_dir)
    lower = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=2, seed=2)
    assert_error(upload(client, lower), 409, "stale_version")
    assert snapshot(client, data_dir) == before


def test_deactivated_key_cannot_publish(client, publisher, published, tmp_path, data_dir):
    with client.app.state.engine.begin() as conn:
        conn.execute(Publisher.__table__.update().values(active=False))
    files = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=2, seed=2)
    assert_error(upload(client, files), 403, "key_revoked")


def test_lost_unique_race_is_stale_and_cleans_its_blobs(client, publisher, published, tmp_path, data_dir, monkeypatch):
    # Simulate a concurrent upload of the same version winning between our check and our commit.
    service = client.app.state.service
    monkeypatch.setattr(service, "_check_version_rule", lambda session, manifest: None)
    rival = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=1, seed=9)
    assert rival[ADAPTER_WEIGHTS_FILE] != published[ADAPTER_WEIGHTS_FILE]
    before = snapshot(client, data_dir)

    assert_error(upload(client, rival), 409, "stale_version")

    after = snapshot(client, data_dir)
    assert after == before  # new blobs deleted; shared ones (the config) kept
    for name in BUNDLE_FILES:
        assert client.get(f"/v1/adapters/city-streets/1/files/{name}").content == published[name]


def test_concurrent_uploads_of_one_version_store_exactly_one(client, publisher, tmp_path, data_dir):
    bundles = [
        bundle_factory.make_bundle_files(tmp_path, publisher, name="contested", version=1, seed=s) for s in range(6)
    ]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda files: upload(client, files), bundles))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 5, [r.text for r in responses]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"stale_version"}
    winner = bundles[[r.status_code for r in responses].index(201)]
    state = snapshot(client, data_dir)
    assert state["rows"]["adapters"] == 1 and state["rows"]["adapter_files"] == 4
    assert len(state["blobs"]) == 4
    assert client.get(f"/v1/adapters/contested/1/files/{ADAPTER_WEIGHTS_FILE}").content == winner[ADAPTER_WEIGHTS_FILE]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_upload_is_413(chunked, tmp_path, data_dir):
    with make_client(data_dir, max_upload_bytes=4096) as client:
        key = keys.generate_key()
        register(client, key)
        files = bundle_factory.make_bundle_files(tmp_path, key)
        assert sum(len(d) for d in files.values()) > 4096
        before = snapshot(client, data_dir)
        if chunked:
            boundary = "semla-test-boundary"
            body = b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}"\r\n\r\n'.encode() + d + b"\r\n"
                for n, d in files.items()
            ) + f"--{boundary}--\r\n".encode()

            def stream():
                for i in range(0, len(body), 1024):
                    yield body[i : i + 1024]

            resp = client.post(
                "/v1/adapters", content=stream(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
            assert "content-length" not in {k.lower() for k in resp.request.headers}
        else:
            resp = upload(client, files)
        assert_error(resp, 413, "too_large")
        assert snapshot(client, data_dir) == before


def test_upload_must_be_multipart(client):
    assert_error(client.post("/v1/adapters", json={"x": 1}), 400, "invalid_form")
    truncated = b'--b\r\nContent-Disposition: form-data; name="manifest.json"\r\n\r\n{}'
    resp = client.post("/v1/adapters", content=truncated, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_error(resp, 400, "invalid_form")


def test_duplicate_part_is_refused(client, publisher, published, tmp_path):
    parts = [(n, (n, d, "application/octet-stream")) for n, d in published.items()]
    parts.append((MANIFEST_FILE, (MANIFEST_FILE, published[MANIFEST_FILE], "application/json")))
    assert_error(client.post("/v1/adapters", files=parts), 422, "extra_file")


# -- file routes never touch the filesystem with user strings -----------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/v1/adapters/city-streets/1/files/registry.db",
        "/v1/adapters/city-streets/1/files/..%2F..%2Fregistry.db",
        "/v1/adapters/city-streets/1/files/%2e%2e",
        "/v1/adapters/..%2F..%2Fetc/1/files/manifest.json",
        "/v1/adapters/%2e%2e/1/manifest",
        "/v1/adapters/.hidden/1/files/manifest.json",
        "/v1/adapters/City-Streets/1/manifest",
        "/v1/adapters/city-streets/0/manifest",
        "/v1/adapters/city-streets/1/files/",
    ],
)
def test_traversal_ish_paths_are_refused(path, client, published):
    resp = client.get(path)
    assert resp.status_code in (404, 422), (path, resp.status_code)
    assert resp.json()["error"]["code"] in ("not_found", "invalid_request")
    assert b"SQLite" not in resp.content


def test_missing_blob_is_a_logged_500(tmp_path, data_dir, caplog):
    bundle_factory.install_base_card(data_dir)
    with TestClient(create_app(ServerSettings(data_dir=data_dir, admin_token=ADMIN)), raise_server_exceptions=False) as client:
        key = keys.generate_key()
        register(client, key)
        files = bundle_factory.make_bundle_files(tmp_path, key)
        assert upload(client, files).status_code == 201
        client.app.state.blobs.delete(hashlib.sha256(files[SIGNATURE_FILE]).hexdigest())
        assert_error(client.get(f"/v1/adapters/city-streets/1/files/{SIGNATURE_FILE}"), 500, "storage_error")
    logged = [r for r in caplog.records if r.name == "semla.http" and r.levelname == "ERROR"]
    assert logged and "missing from the store" in str(logged[0].exc_info[1])


# -- torch-free import, CLI, real loopback server -------------------------------------------------
def test_server_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import semla.server, semla.server.app, semla.server.cli; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_help_mentions_env_vars():
    proc = subprocess.run([str(BIN_DIR / "semla-server"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for env in ("SEMLA_DATA_DIR", "SEMLA_HOST", "SEMLA_PORT", "SEMLA_ADMIN_TOKEN", "SEMLA_DATABASE_URL"):
        assert env in proc.stdout


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--port", "70000"], {}), ([], {"SEMLA_PORT": "not-a-port"}), (["--database-url", "nonsense"], {})],
    ids=["flag", "env", "database-url"],
)
def test_cli_bad_settings_exit_2_without_traceback(args, env, tmp_path):
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [str(BIN_DIR / "semla-server"), "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True, text=True, timeout=60, env=full_env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("semla-server: error:")


def test_real_server_on_loopback(tmp_path, free_port):
    port = free_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMLA_")}
    proc = subprocess.Popen(
        [str(BIN_DIR / "semla-server"), "--data-dir", str(tmp_path / "d"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if status == 200:
                break
        assert status == 200, f"server did not come up (exit {proc.poll()})"
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert '"GET /healthz HTTP/1.1" 200' in out, (out, err)
    assert (tmp_path / "d" / "registry.db").is_file()


# -- server-side retrieval ------------------------------------------------------------------------
def test_retrieve_matches_the_node_math_and_refuses_bad_queries(tmp_path, client, publisher):
    import numpy as np

    from semla.registry.retrieval import CentroidTable, retrieve_numpy

    for i, name in enumerate(["alpha", "beta", "gamma"]):
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, publisher, name=name, seed=i, k=1 + i)).status_code == 201
    listing = client.get("/v1/adapters").json()
    query = listing[1]["centroids"][0]
    body = {"embedding": query, "base_fingerprint": bundle_factory.FINGERPRINT, "top_k": 5, "temperature": 0.1}
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results][0] == "beta" and len(results) == 3  # capped at the library
    assert sum(x["weight"] for x in results) == pytest.approx(1.0)
    table = CentroidTable.from_lists([a["centroids"] for a in listing])
    idx, dist, w = retrieve_numpy(np.asarray([query]), table, top_k=5, temperature=0.1)
    assert [x["name"] for x in results] == [listing[i]["name"] for i in idx[0]]
    assert [x["weight"] for x in results] == pytest.approx(w[0].tolist(), abs=1e-6)

    assert upload(client, bundle_factory.make_bundle_files(tmp_path, publisher, name="delta", seed=9)).status_code == 201
    assert len(client.post("/v1/retrieve", json=body).json()["results"]) == 4

    bad = [({**body, "embedding": query[:-1]}, 400, "invalid_input"),
           ({**body, "base_fingerprint": "0" * 64}, 404, "not_found"),
           ({**body, "embedding": [0.0] * len(query)}, 422, "invalid_request"),
           ({**body, "top_k": 0}, 422, "invalid_request")]
    for payload, status, code in bad:
        r = client.post("/v1/retrieve", json=payload)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_orphan_sweep_removes_only_old_unreferenced_files(client, published, data_dir):
    service = client.app.state.service
    store = service._blobs
    orphan = store.put(b"an orphan blob: written, never committed")
    temp = store.path(orphan).parent / ".tmp-leftover"
    temp.write_bytes(b"half written")
    assert service.sweep_orphans(min_age_s=3600) == {"blobs": 0, "temp_files": 0, "kept_young": 2}
    assert service.sweep_orphans(min_age_s=0) == {"blobs": 1, "temp_files": 1, "kept_young": 0}
    assert not store.exists(orphan) and not temp.exists()
    for name, data in published.items():  # the published bundle is untouched
        assert client.get(f"/v1/adapters/city-streets/1/files/{name}").content == data


# -- revocation -----------------------------------------------------------------------------------
def _revoke(client, key, name: str, version: int):
    from semla.schemas import revocation_payload

    signature = keys.sign(key, revocation_payload(name, version)).hex()
    return client.post(f"/v1/adapters/{name}/{version}/revoke", json={"signature": signature})


def test_publisher_revokes_a_version_and_the_previous_one_returns(client, publisher, tmp_path):
    for version in (1, 2):
        files = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=version)
        assert upload(client, files).status_code == 201
    assert_error(_revoke(client, keys.generate_key(), "city-streets", 2), 403, "bad_signature")  # not the publisher
    r = _revoke(client, publisher, "city-streets", 2)
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert [(a["name"], a["version"]) for a in client.get("/v1/adapters").json()] == [("city-streets", 1)]
    versions = client.get("/v1/adapters/city-streets").json()
    assert [(a["version"], a["revoked"]) for a in versions] == [(2, True), (1, False)]
    assert_error(_revoke(client, publisher, "city-streets", 2), 409, "already_revoked")
    assert_error(_revoke(client, publisher, "city-streets", 7), 404, "not_found")
    # a revoked version still blocks its number: a replay of v2 is refused
    replay = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=2)
    assert_error(upload(client, replay), 409, "stale_version")


def test_admin_revokes_a_key_and_its_adapters_leave_the_index(client, publisher, published, tmp_path, data_dir):
    key_id = keys.key_id(publisher)
    assert_error(client.post(f"/v1/keys/{key_id}/revoke"), 401, "unauthorized")
    r = client.post(f"/v1/keys/{key_id}/revoke", headers=AUTH)
    assert r.status_code == 200 and r.json()["active"] is False
    assert client.get("/v1/adapters").json() == []
    assert_error(client.post(f"/v1/keys/{'0' * 16}/revoke", headers=AUTH), 404, "not_found")
    newer = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=2)
    before = snapshot(client, data_dir)
    assert_error(upload(client, newer), 403, "key_revoked")  # a revoked key cannot publish
    assert snapshot(client, data_dir) == before


def test_uploads_are_rate_limited_per_key(data_dir, tmp_path):
    with make_client(data_dir, uploads_per_minute=2) as client:
        fast, other = keys.generate_key(), keys.generate_key()
        register(client, fast)
        register(client, other)
        for version in (1, 2):
            assert upload(client, bundle_factory.make_bundle_files(tmp_path, fast, name="a", version=version)).status_code == 201
        before = snapshot(client, data_dir)
        assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, fast, name="a", version=3)), 429, "rate_limited")
        assert snapshot(client, data_dir) == before  # nothing of the refused upload stays
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, other, name="b")).status_code == 201  # per key


# -- key rotation ---------------------------------------------------------------------------------
def _rotate(client, old, new):
    from semla.schemas import rotation_payload

    new_hex = keys.public_bytes(new).hex()
    sig = keys.sign(old, rotation_payload(keys.key_id(old), new_hex)).hex()
    return client.post("/v1/keys/rotate", json={"old_key_id": keys.key_id(old), "new_public_key": new_hex,
                                                "signature": sig})


def test_rotated_key_hands_its_names_to_the_new_key(client, publisher, published, tmp_path, data_dir):
    new = keys.generate_key()
    forged = _rotate(client, keys.generate_key(), new)
    assert_error(forged, 404, "not_found")  # unknown old key
    bad = client.post("/v1/keys/rotate", json={**_rotate_body(publisher, new), "signature": "00" * 64})
    assert_error(bad, 403, "bad_signature")
    r = _rotate(client, publisher, new)
    assert r.status_code == 201 and r.json()["key_id"] == keys.key_id(new)
    assert_error(_rotate(client, publisher, keys.generate_key()), 409, "already_rotated")
    # the old key publishes no more; the new one continues its names; old adapters stay listed
    old_v2 = bundle_factory.make_bundle_files(tmp_path, publisher, name="city-streets", version=2)
    before = snapshot(client, data_dir)
    assert_error(upload(client, old_v2), 403, "key_rotated")
    assert snapshot(client, data_dir) == before  # nothing of the refused upload stays
    assert [(a["name"], a["version"]) for a in client.get("/v1/adapters").json()] == [("city-streets", 1)]
    new_v2 = bundle_factory.make_bundle_files(tmp_path, new, name="city-streets", version=2)
    assert upload(client, new_v2).status_code == 201
    index_keys = set(tuf_view(client, str(client.base_url), tmp_path / "node").keys)
    assert {keys.key_id(publisher), keys.key_id(new)} <= index_keys  # old bundles still verify on nodes
    other = keys.generate_key()
    register(client, other)
    stolen = bundle_factory.make_bundle_files(tmp_path, other, name="city-streets", version=3)
    assert_error(upload(client, stolen), 409, "name_taken")


def _rotate_body(old, new) -> dict:
    return {"old_key_id": keys.key_id(old), "new_public_key": keys.public_bytes(new).hex(), "signature": "00" * 64}
