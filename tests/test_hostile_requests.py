"""Hostile requests: every input a publisher or any client can send is refused with its own 4xx
before it costs memory or leaves a trace, and the trust rules hold against rotated, revoked and
damaged keys.

The matrix has one row per failure class: the exact status and error code, and the registry's
state afterwards (table rows, blob files, the TUF snapshot version and adapters) unchanged.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bundle_factory
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from tuf_view import tuf_view

from semla.registry import keys
from semla.registry.asgi import DOCS_ASSETS_URL, BodyLimits
from semla.registry.http import RegistryClient
from semla.schemas import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    revocation_payload,
    rotation_payload,
    strict_json_loads,
)
from semla.schemas.errors import ManifestError, RegistryError, SemlaError, VerificationError
from semla.server import ServerSettings, create_app
from semla.server.db import Adapter, AdapterFile, Publisher
from semla.server.local import serve_in_thread

ADMIN = "hostile-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
FP = bundle_factory.FINGERPRINT


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture()
def registry(tmp_path):
    """A registry with one publisher key and ``city-streets`` v1 published: (client, key, data dir)."""
    data_dir = tmp_path / "data"
    bundle_factory.install_base_card(data_dir)
    with TestClient(create_app(ServerSettings(data_dir=data_dir, admin_token=ADMIN))) as client:
        key = keys.generate_key()
        register(client, key)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key)).status_code == 201
        yield client, key, data_dir


def register(client: TestClient, key) -> None:
    r = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()}, headers=AUTH)
    assert r.status_code == 201, r.text


def upload(client: TestClient, files: dict[str, bytes]) -> httpx.Response:
    return client.post("/v1/adapters", files={n: (n, d, "application/octet-stream") for n, d in files.items()})


def state(client: TestClient, data_dir: Path) -> dict:
    """Rows per table, every blob file, and the TUF snapshot version and adapters a node sees."""
    with client.app.state.engine.connect() as conn:
        rows = {t.__tablename__: conn.scalar(select(func.count()).select_from(t)) for t in (Publisher, Adapter, AdapterFile)}
    blobs = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blobs").rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory() as node:
        view = tuf_view(client, str(client.base_url), Path(node))
        return {"rows": rows, "blobs": blobs, "index": (view.version, [a.model_dump() for a in view.library()])}


def assert_error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.json()
    return resp.json()["error"]["message"]


def safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _signed(tmp_path, key, **fields) -> dict[str, bytes]:
    return bundle_factory.make_bundle_files(tmp_path, key, name="hostile", **fields)


def _raw_manifest(data: bytes) -> Callable:
    return lambda tmp_path, key: {**_signed(tmp_path, key), MANIFEST_FILE: data}


def _manifest_edit(change: Callable[[dict], None]) -> Callable:
    return lambda tmp_path, key: bundle_factory.edit_manifest(_signed(tmp_path, key), change, resign_with=key)


def _weights(data: bytes) -> Callable:
    return lambda tmp_path, key: bundle_factory.replace_file(_signed(tmp_path, key), ADAPTER_WEIGHTS_FILE, data, key=key)


def _config(data: bytes) -> Callable:
    return lambda tmp_path, key: bundle_factory.replace_file(_signed(tmp_path, key), ADAPTER_CONFIG_FILE, data, key=key)


def _gaussian(epsilon: float, delta: float, clip_norm: float = 1.0) -> Callable:
    privacy = {"mechanism": "gaussian", "epsilon": epsilon, "delta": delta, "clip_norm": clip_norm, "min_samples": 50}
    return _manifest_edit(lambda m: m.update(privacy=privacy))


HEADER_ENTRY = '{"dtype":"F32","shape":[%s,4],"data_offsets":[0,0]}'

#: (row id, upload builder (tmp_path, key) -> files, status, code)
UPLOADS = [
    ("manifest-100k-nested-unsigned", _raw_manifest(b"[" * 100_000), 422, "json_too_deep"),
    ("manifest-5000-digit-integer", _raw_manifest(b'{"version":' + b"9" * 5000 + b"}"), 422, "json_number_too_long"),
    ("manifest-3MiB", _raw_manifest(b"[" + b"{}," * (1024 * 1024) + b"{}]"), 422, "json_too_large"),
    ("manifest-many-containers", _raw_manifest(b"[" + b"{}," * 100_000 + b"{}]"), 422, "json_too_many_values"),
    ("manifest-float-overflow", _raw_manifest(b'{"alpha":1e999}'), 422, "manifest_invalid"),
    ("sample-count-2^64", _manifest_edit(lambda m: m.update(sample_count=2**64)), 422, "manifest_invalid"),
    ("version-2^64", _manifest_edit(lambda m: m.update(version=2**64)), 422, "manifest_invalid"),
    ("epsilon-1e-300-delta-0.999999", _gaussian(1e-300, 0.999999), 422, "manifest_invalid"),
    ("delta-above-1-over-n", _gaussian(1.0, 0.05), 422, "manifest_invalid"),
    ("epsilon-above-100", _gaussian(1000.0, 1e-5), 422, "manifest_invalid"),
    ("negative-clip-norm", _gaussian(1.0, 1e-5, clip_norm=-1.0), 422, "manifest_invalid"),
    ("impossible-date", _manifest_edit(lambda m: m.update(created_at="2026-02-30T00:00:00Z")), 422, "manifest_invalid"),
    ("vocabulary-word-10k", _manifest_edit(lambda m: m.update(vocabulary=["x" * 10_000])), 422, "manifest_invalid"),
    ("lr-negative", _manifest_edit(lambda m: m["training"].update(lr=-1.0)), 422, "manifest_invalid"),
    ("header-100k-nested", _weights(safetensors_with_header(b"[" * 100_000)), 422, "json_too_deep"),
    ("header-5000-digit-shape", _weights(safetensors_with_header(
        ('{"t":' + HEADER_ENTRY % ("9" * 5000) + "}").encode())), 422, "json_number_too_long"),
    ("header-shape-2^64", _weights(safetensors_with_header(
        ('{"t":' + HEADER_ENTRY % str(2**64) + "}").encode())), 422, "tensor_format"),
    ("header-2MiB", _weights(safetensors_with_header(b" " * (2 * 1024 * 1024))), 422, "json_too_large"),
    ("adapter-config-100k-nested", _config(b"[" * 100_000), 422, "json_too_deep"),
    ("adapter-config-5000-digit-rank", _config(b'{"r":' + b"7" * 5000 + b"}"), 422, "json_number_too_long"),
]

_RETRIEVE = {"base_fingerprint": FP, "top_k": 1}
#: (row id, method, path, content, headers, status, code) for JSON request bodies
BODIES = [
    ("retrieve-100k-nested", "POST", "/v1/retrieve", b"[" * 100_000, {}, 422, "json_too_deep"),
    ("retrieve-2MiB", "POST", "/v1/retrieve", b'{"embedding":[' + b"0.5," * 500_000 + b'0.5]}', {}, 413, "too_large"),
    ("retrieve-many-containers", "POST", "/v1/retrieve", json.dumps({**_RETRIEVE, "embedding": [[1.0]] * 2000}).encode(),
     {}, 422, "json_too_many_values"),
    ("retrieve-5000-digit-number", "POST", "/v1/retrieve",
     b'{"embedding":[1,' + b"1" * 5000 + b'],"base_fingerprint":"' + FP.encode() + b'"}', {}, 422, "json_number_too_long"),
    ("keys-100k-nested-admin", "POST", "/v1/keys", b"{" * 100_000, AUTH, 422, "json_too_deep"),
    ("keys-untyped-body", "POST", "/v1/keys", b"[" * 100_000, {**AUTH, "content-type": ""}, 422, "json_too_deep"),
    ("rotate-5000-digit", "POST", "/v1/keys/rotate", b'{"old_key_id":' + b"1" * 5000 + b"}", {}, 422,
     "json_number_too_long"),
    ("revoke-100k-nested", "POST", "/v1/adapters/city-streets/1/revoke", b"[" * 100_000, {}, 422, "json_too_deep"),
    ("revoke-version-2^64", "POST", f"/v1/adapters/city-streets/{2**64}/revoke", b'{"signature":"00"}', {}, 422,
     "invalid_request"),
    ("declared-length-too-large", "POST", "/v1/retrieve", b"{}", {"content-length": str(64 * 1024 * 1024)}, 413,
     "too_large"),
]


# -- the matrix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("build,status,code", [row[1:] for row in UPLOADS], ids=[row[0] for row in UPLOADS])
def test_a_hostile_upload_is_refused_and_leaves_nothing(registry, tmp_path, build, status, code):
    client, key, data_dir = registry
    files = build(tmp_path, key)
    before = state(client, data_dir)
    assert_error(upload(client, files), status, code)
    assert state(client, data_dir) == before


@pytest.mark.parametrize("method,path,content,headers,status,code", [row[1:] for row in BODIES],
                         ids=[row[0] for row in BODIES])
def test_a_hostile_json_body_is_refused_before_parsing(registry, method, path, content, headers, status, code):
    client, _, data_dir = registry
    before = state(client, data_dir)
    headers = {"content-type": "application/json", **headers}
    if not headers["content-type"]:
        del headers["content-type"]
    assert_error(client.request(method, path, content=content, headers=headers), status, code)
    assert state(client, data_dir) == before


def test_limits_are_checked_before_parsing_and_legit_documents_pass():
    assert strict_json_loads(b'{"a":[1,2.5,{"b":"[[[[\\"]]]"}],"c":-1e-300}') == {
        "a": [1, 2.5, {"b": '[[[["]]]'}], "c": -1e-300}  # brackets inside strings do not count
    with pytest.raises(ManifestError) as info:
        strict_json_loads(b"[" + b"{}," * (11 * 1024 * 1024) + b"{}]")  # 32 MiB, refused on its size alone
    assert info.value.code == "json_too_large"


# -- trust ----------------------------------------------------------------------------------------
def _revoke(client, key, name: str, version: int) -> httpx.Response:
    signature = keys.sign(key, revocation_payload(name, version)).hex()
    return client.post(f"/v1/adapters/{name}/{version}/revoke", json={"signature": signature})


def _rotate(client, old, new) -> httpx.Response:
    new_hex = keys.public_bytes(new).hex()
    sig = keys.sign(old, rotation_payload(keys.key_id(old), new_hex)).hex()
    return client.post("/v1/keys/rotate", json={"old_key_id": keys.key_id(old), "new_public_key": new_hex,
                                                "signature": sig})


def test_the_successor_key_revokes_and_the_rotated_away_key_can_do_nothing(registry, tmp_path):
    client, k1, data_dir = registry
    k3, k5 = keys.generate_key(), keys.generate_key()
    assert _rotate(client, k1, k3).status_code == 201
    assert upload(client, bundle_factory.make_bundle_files(tmp_path, k3, version=2)).status_code == 201
    before = state(client, data_dir)
    assert_error(_revoke(client, k1, "city-streets", 1), 403, "key_rotated")  # its own old version
    assert_error(_revoke(client, k1, "city-streets", 2), 403, "key_rotated")
    assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, k1, version=3)), 403, "key_rotated")
    assert_error(_rotate(client, k1, keys.generate_key()), 409, "already_rotated")
    assert state(client, data_dir) == before
    assert _rotate(client, k3, k5).status_code == 201  # k1 -> k3 -> k5: k5 manages everything
    assert_error(_revoke(client, k3, "city-streets", 1), 403, "key_rotated")
    r = _revoke(client, k5, "city-streets", 1)
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert _revoke(client, k5, "city-streets", 2).status_code == 200
    assert client.get("/v1/adapters").json() == []


def test_revoked_files_answer_410(registry, tmp_path):
    client, key, _ = registry
    assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, version=2)).status_code == 201
    assert _revoke(client, key, "city-streets", 2).status_code == 200
    assert_error(client.get("/v1/adapters/city-streets/2/manifest"), 410, "revoked")
    for name in (ADAPTER_WEIGHTS_FILE, MANIFEST_FILE):
        assert_error(client.get(f"/v1/adapters/city-streets/2/files/{name}"), 410, "revoked")
    assert client.get("/v1/adapters/city-streets/1/manifest").status_code == 200  # the live one is served
    assert client.post(f"/v1/keys/{keys.key_id(key)}/revoke", headers=AUTH).status_code == 200
    assert_error(client.get(f"/v1/adapters/city-streets/1/files/{ADAPTER_WEIGHTS_FILE}"), 410, "revoked")


def test_each_signature_failure_names_what_it_checked(registry, tmp_path):
    client, key, _ = registry
    stranger = keys.generate_key()
    message = assert_error(_revoke(client, stranger, "city-streets", 1), 403, "bad_signature")
    assert "revoke request" in message
    bad_rotate = {"old_key_id": keys.key_id(key), "new_public_key": keys.public_bytes(stranger).hex(),
                  "signature": "00" * 64}
    assert "rotate request" in assert_error(client.post("/v1/keys/rotate", json=bad_rotate), 403, "bad_signature")
    files = bundle_factory.make_bundle_files(tmp_path, key, version=2)
    forged = bundle_factory.edit_manifest(files, lambda m: m.update(domain="elsewhere"))
    assert "manifest" in assert_error(upload(client, forged), 403, "bad_signature")


# -- node trust: pin file and offline path --------------------------------------------------------
@pytest.fixture()
def node_registry(tmp_path, trained_bundle):
    from semla.client import publish_bundle

    app = create_app(ServerSettings(data_dir=tmp_path / "registry", admin_token=ADMIN))
    http = TestClient(app, base_url="http://registry.test")
    client = RegistryClient("http://registry.test", client=http)
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), ADMIN)
    publish_bundle(shutil.copytree(trained_bundle, tmp_path / "fog"), client, key=key)
    return client, http


def failing_client(http: TestClient, url: str) -> RegistryClient:
    """A registry client whose TUF requests answer ``client.failing`` (an HTTP status) once it is set."""

    def answer(request: httpx.Request) -> httpx.Response:
        if client.failing and request.url.path.startswith("/tuf/"):
            return httpx.Response(client.failing, content=b"registry down")
        r = http.request(request.method, str(request.url), content=request.read())
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    client = RegistryClient(url, client=httpx.Client(transport=httpx.MockTransport(answer)))
    client.failing = 0
    return client


@pytest.mark.parametrize("damage", ["garbage", "short", "binary", "unreadable"])
def test_a_damaged_saved_root_is_an_error_never_a_new_trust_on_first_use(node_registry, tiny_base, tmp_path, damage):
    from semla.registry.node import Node

    client, _ = node_registry
    cache = tmp_path / "cache"
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=cache)
    node.pull()
    root = node._index.directory / "metadata" / "root.json"
    good = root.read_bytes()
    if damage == "unreadable":
        root.unlink()
        root.mkdir()  # reading a directory fails like an unreadable file, also as root
    else:
        root.write_bytes({"garbage": b"not a root\n", "short": good[:20], "binary": b"\xff\xfe" * 40}[damage])
    with pytest.raises(SemlaError) as info:
        Node(client, base=node.base, cache_dir=cache).pull()
    expected = ("cache_error", RegistryError) if damage == "unreadable" else ("tuf_invalid", VerificationError)
    assert (info.value.code, type(info.value)) == expected, info.value
    if damage != "unreadable":
        assert root.read_bytes() != good  # the registry's root was not trusted again behind the operator's back


@pytest.mark.parametrize("damage", ["garbage", "short", "unreadable"])
def test_a_damaged_registry_key_pin_is_an_error_never_a_new_trust_on_first_use(node_registry, tiny_base, tmp_path,
                                                                                damage):
    """A node upgraded from before TUF keeps its registry-key pin: damaged, it is refused, not skipped."""
    from semla.registry.node import Node

    client, _ = node_registry
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    pin = node._pin_path()
    pin.parent.mkdir(parents=True)
    if damage == "unreadable":
        pin.mkdir()
    else:
        pin.write_bytes({"garbage": b"not a key\n", "short": b"ab" * 10}[damage])
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "pin_unreadable"
    from semla.registry.tufindex import directory_for

    trusted = directory_for(tmp_path / "cache", client.url) / "metadata" / "root.json"
    assert not trusted.exists()  # no root trusted on first use


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_registry_counts_as_unreachable_and_the_node_serves_from_its_cache(
        node_registry, tiny_base, tmp_path, status):
    from semla.registry.node import Node

    client, http = node_registry
    failing = failing_client(http, client.url)
    node = Node(failing, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    library = [(a.name, a.version) for a in node.pull()]
    failing.failing = status
    again = Node(failing, base=node.base, cache_dir=tmp_path / "cache")
    assert [(a.name, a.version) for a in again.pull()] == library
    assert again.offline and again.health()["status"] == "offline"
    failing.failing = 0
    again.pull()
    assert not again.offline
    fresh = failing_client(http, client.url)
    fresh.failing = status
    with pytest.raises(RegistryError) as info:  # nothing cached: an error, not a crash
        Node(fresh, base=node.base, cache_dir=tmp_path / "empty").pull()
    assert info.value.code == "unreachable"


# -- slow bodies ----------------------------------------------------------------------------------
SLOW = BodyLimits(idle_timeout_s=0.6, min_rate=64.0, grace_s=1.0)


#: The start of a well-formed multipart body: one file part, whose data then arrives a byte at a time.
MULTIPART_START = b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'


def _dribble(url: str, path: str, content_type: str, connections: int, deadline_s: float) -> list[tuple[int, float]]:
    """Open ``connections`` sockets that each send one byte every 0.1 s (after the headers and, for a
    multipart body, the start of a part); return each one's (status, seconds until the server
    answered and closed)."""
    start_of_body = MULTIPART_START if content_type.startswith("multipart/") else b""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(connections):
        s = socket.create_connection((host, int(port)), timeout=deadline_s)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: 100000\r\n\r\n".encode() + start_of_body)
        s.setblocking(False)
        socks.append([s, b"", None])
    start = time.monotonic()
    while time.monotonic() - start < deadline_s and any(entry[2] is None for entry in socks):
        for entry in socks:
            s, buf, done = entry
            if done is not None:
                continue
            try:
                s.send(b"a")
            except OSError:
                pass
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                entry[1] += chunk
            else:  # closed by the server
                entry[2] = time.monotonic() - start
        time.sleep(0.1)
    results = []
    for s, buf, done in socks:
        s.close()
        status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/1.1 ") else 0
        results.append((status, done if done is not None else float("inf")))
    return results


@pytest.mark.parametrize("path,content_type", [
    ("/v1/retrieve", "application/json"),
    ("/v1/adapters", "multipart/form-data; boundary=xyz"),
])
def test_slow_bodies_are_cut_off_on_the_registry(tmp_path, path, content_type):
    settings = ServerSettings(data_dir=tmp_path / "data", body_idle_timeout_s=SLOW.idle_timeout_s,
                              body_min_rate=SLOW.min_rate, body_grace_s=SLOW.grace_s)
    with serve_in_thread(create_app(settings)) as url:
        results = _dribble(url, path, content_type, connections=5, deadline_s=15.0)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # still answering others
    # 1 byte per 0.1 s is 10 bytes/s, under 64 bytes/s: each is cut after the 1 s grace plus what
    # its few bytes earned, far before the 100000 declared bytes could arrive.
    assert [status for status, _ in results] == [408] * 5
    assert max(seconds for _, seconds in results) < 8.0


def test_slow_bodies_are_cut_off_on_the_node_service(tiny_base, tmp_path):
    from semla.registry.node import Node
    from semla.registry.serve import ServeSettings, create_app as create_node_app

    node = Node("http://127.0.0.1:9", base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    app = create_node_app(node, ServeSettings(body_limits=SLOW))
    with serve_in_thread(app, lifespan="off") as url:
        results = _dribble(url, "/v1/segment", "multipart/form-data; boundary=xyz", connections=3, deadline_s=15.0)
    assert [status for status, _ in results] == [408] * 3
    assert max(seconds for _, seconds in results) < 8.0


# -- offline docs ---------------------------------------------------------------------------------
def _docs_are_offline(client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html and "//cdn" not in html, page
        assets = [part.split('"', 1)[0] for part in html.split(f'"{DOCS_ASSETS_URL}/')[1:]]
        assert assets, page
        for asset in assets:
            r = client.get(f"{DOCS_ASSETS_URL}/{asset}")
            assert r.status_code == 200 and len(r.content) > 1000, asset
    assert client.get("/openapi.json").status_code == 200


def test_registry_docs_load_no_external_asset(registry):
    _docs_are_offline(registry[0])


def test_node_docs_load_no_external_asset(tiny_base, tmp_path):
    from semla.registry.node import Node
    from semla.registry.serve import create_app as create_node_app

    node = Node("http://127.0.0.1:9", base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    _docs_are_offline(TestClient(create_node_app(node)))


def test_hostile_tuf_metadata_is_refused_before_parsing(tmp_path):
    """A first root nested 100k deep (or larger than the root cap) is refused, never parsed into memory."""
    from semla.registry.tufindex import TufIndex

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"signed":' + b"[" * 100_000)

    http = httpx.Client(transport=httpx.MockTransport(answer))
    with pytest.raises(SemlaError) as info:
        TufIndex(http, "http://registry.test", tmp_path / "tuf").refresh()
    assert info.value.code in ("tuf_invalid", "registry_key"), info.value
    assert not (tmp_path / "tuf" / "metadata" / "root.json").exists()
