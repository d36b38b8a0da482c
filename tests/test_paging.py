"""Paged listings (adapters, versions, keys), the clients that follow them, and the library
version counter (one row, raised in each change's own transaction, seeded by migration 0005)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import bundle_factory
import httpx
import pytest
from fastapi.testclient import TestClient
from tuf_view import snapshot_version
from sqlalchemy import insert

from semla.registry import keys
from semla.registry.http import RegistryClient
from semla.schemas import canonical_json, revocation_payload, rotation_payload
from semla.schemas.errors import RegistryError
from semla.server import ServerSettings, create_app
from semla.server.db import Adapter, Publisher, alembic_config, library_version, make_engine, upgrade, utcnow
from semla.server.paging import MAX_LIMIT, encode_cursor
from semla.server.service.library import with_summary

ADMIN = "paging-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]
DOMAINS = {"alpha": "fog roads", "bravo": "night city", "charlie": "fog harbour", "delta": "snow fields",
           "echo": "foggy night docks"}


def _register(http: TestClient, key) -> None:
    resp = http.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": "t"}, headers=AUTH)
    assert resp.status_code == 201, resp.text


def _upload(http: TestClient, files: dict[str, bytes]) -> httpx.Response:
    return http.post("/v1/adapters", files={n: (n, d, "application/octet-stream") for n, d in files.items()})


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A registry with five adapters (``echo`` in three versions) by one key, plus two more keys."""
    tmp = tmp_path_factory.mktemp("paging")
    bundle_factory.install_base_card(tmp / "data")
    http = TestClient(create_app(ServerSettings(data_dir=tmp / "data", admin_token=ADMIN)))
    key = keys.generate_key()
    _register(http, key)
    for i, name in enumerate(reversed(NAMES)):  # published out of name order
        for version in (1, 2, 3) if name == "echo" else (1,):
            files = bundle_factory.make_bundle_files(tmp, key, name=name, version=version, domain=DOMAINS[name],
                                                     seed=i)
            assert _upload(http, files).status_code == 201
    for _ in range(2):
        _register(http, keys.generate_key())
    return http, key


def _walk(http: TestClient, path: str, **params) -> tuple[list[dict], int]:
    """Every item of a listing, following Link headers; also the number of pages."""
    items, pages = [], 0
    url = path
    while True:
        resp = http.get(url, params=params if pages == 0 else None)
        assert resp.status_code == 200, resp.text
        items += resp.json()
        pages += 1
        link = resp.links.get("next")
        if link is None:
            return items, pages
        assert link["url"].startswith("http://testserver" + path + "?")
        url = link["url"]


def test_adapter_listing_pages_follow_links_in_name_order(library):
    http, _ = library
    items, pages = _walk(http, "/v1/adapters", limit=2)
    assert [a["name"] for a in items] == NAMES and pages == 3
    assert next(a for a in items if a["name"] == "echo")["version"] == 3  # the newest version only
    one_page = http.get("/v1/adapters", params={"limit": MAX_LIMIT})
    assert [a["name"] for a in one_page.json()] == NAMES and "link" not in one_page.headers
    assert [a["name"] for a in http.get("/v1/adapters").json()] == NAMES  # default page holds them all


def test_filters_hold_across_pages_and_a_cursor_is_bound_to_them(library):
    http, _ = library
    items, pages = _walk(http, "/v1/adapters", domain="FOG", limit=1)
    assert [a["name"] for a in items] == ["alpha", "charlie", "echo"] and pages == 3
    first = http.get("/v1/adapters", params={"domain": "fog", "limit": 1})
    cursor = first.links["next"]["url"].split("cursor=")[1]
    other_filter = http.get("/v1/adapters", params={"domain": "night", "limit": 1, "cursor": cursor})
    assert other_filter.status_code == 400 and other_filter.json()["error"]["code"] == "bad_cursor"
    assert "other filters" in other_filter.json()["error"]["message"]


@pytest.mark.parametrize("cursor", [
    "not a cursor!",
    "e30",  # {} in base64
    base64.urlsafe_b64encode(b"\xff\xfe garbage").decode(),
    base64.urlsafe_b64encode(b'{"k": "adapters", "a": "x", "s": "0", "k": 1}').decode(),  # duplicate key
    base64.urlsafe_b64encode(canonical_json({"k": "adapters", "a": "../etc", "s": "x"})).decode(),
    base64.urlsafe_b64encode(b"[" * 400 + b"]" * 400).decode()[:500],
    encode_cursor("keys", "0123456789abcdef"),  # a cursor of another listing
    encode_cursor("versions", 2),
    "A" * 513,  # too long
])
def test_a_bad_cursor_is_a_clear_400(library, cursor):
    http, _ = library
    for path in ("/v1/adapters", "/v1/keys", "/v1/adapters/echo"):
        resp = http.get(path, params={"cursor": cursor})
        if path == "/v1/keys" and cursor == encode_cursor("keys", "0123456789abcdef"):
            assert resp.status_code == 400 and "names no key" in resp.json()["error"]["message"]
            continue
        if path == "/v1/adapters/echo" and cursor == encode_cursor("versions", 2):
            continue  # a valid cursor there (tested below)
        assert resp.status_code in (400, 422), (path, resp.text)
        assert resp.json()["error"]["code"] in ("bad_cursor", "invalid_request"), resp.text


@pytest.mark.parametrize("limit", ["0", "-1", str(MAX_LIMIT + 1), "abc", "1e3"])
def test_a_page_size_out_of_bounds_is_refused(library, limit):
    http, _ = library
    for path in ("/v1/adapters", "/v1/keys", "/v1/adapters/echo"):
        resp = http.get(path, params={"limit": limit})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_request", resp.text


def test_versions_and_keys_are_paged(library):
    http, key = library
    items, pages = _walk(http, "/v1/adapters/echo", limit=2)
    assert [a["version"] for a in items] == [3, 2, 1] and pages == 2
    later = http.get("/v1/adapters/echo", params={"cursor": encode_cursor("versions", 2, {"name": "echo"})})
    assert [a["version"] for a in later.json()] == [1]
    assert http.get("/v1/adapters/nope").status_code == 404
    beyond = http.get("/v1/adapters/nope", params={"cursor": encode_cursor("versions", 2, {"name": "nope"})})
    assert beyond.status_code == 404
    everyone, pages = _walk(http, "/v1/keys", limit=2)
    assert len(everyone) == 3 and pages == 2 and everyone[0]["key_id"] == keys.key_id(key)  # oldest first
    assert len({k["key_id"] for k in everyone}) == 3


def test_page_queries_carry_their_row_limit_as_a_number_not_a_parameter(library):
    """With ``LIMIT`` bound as a parameter, PostgreSQL costs a prepared statement's generic plan
    for a tenth of the table and plans every run of a listing page anew; written in as a number,
    the generic plan wins from the sixth run (measured: 0.65 against 0.48 ms of backend CPU a page
    at 100k). Every page's SQL says its limit + 1 itself."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    http, _ = library
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if " LIMIT " in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        for path, params in (("/v1/adapters", {"limit": 2}), ("/v1/adapters", {"limit": 2, "search": "fog"}),
                             ("/v1/adapters/echo", {"limit": 2}), ("/v1/keys", {"limit": 2})):
            before = len(seen)
            assert http.get(path, params=params).status_code == 200
            pages = [sql for sql in seen[before:] if "LIMIT 3" in sql]
            assert pages, (path, params, seen[before:])
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert not [sql for sql in seen if re.search(r"LIMIT\s+(\?|%\(|:)", sql)]


def test_registry_client_follows_every_page(library, monkeypatch):
    http, key = library
    import semla.registry.http as client_module

    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)
    asked = []
    monkeypatch.setattr(http, "event_hooks", {"request": [lambda request: asked.append(request.url)], "response": []})
    client = RegistryClient("http://testserver", client=http)
    assert [a.name for a in client.list_adapters()] == NAMES
    assert len(asked) == 3 and all(u.params["limit"] == "2" for u in asked) and "cursor" in asked[-1].params
    assert [a.name for a in client.list_adapters(domain="night")] == ["bravo", "echo"]
    assert [a.version for a in client.adapter_versions("echo")] == [3, 2, 1]
    assert len(client.list_keys()) == 3 and keys.key_id(key) in client.trusted_keys()


def test_registry_client_stops_a_registry_that_pages_forever_and_stays_on_its_host():
    seen_hosts = []

    def endless(request: httpx.Request) -> httpx.Response:
        seen_hosts.append(request.url.host)
        return httpx.Response(200, json=[], headers={"Link": '<http://evil.example/v1/keys?cursor=same>; rel="next"'})

    client = RegistryClient("http://registry.test", client=httpx.Client(transport=httpx.MockTransport(endless)))
    with pytest.raises(RegistryError) as err:
        client.list_keys()
    assert err.value.code == "bad_page" and seen_hosts == ["registry.test", "registry.test"]

    def not_a_list(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": []})

    client = RegistryClient("http://registry.test", client=httpx.Client(transport=httpx.MockTransport(not_a_list)))
    with pytest.raises(RegistryError, match="JSON list"):
        client.list_adapters()


# -- the library version counter ------------------------------------------------------------------
def test_every_change_raises_the_library_version_by_exactly_one(tmp_path):
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    http = TestClient(app)

    first: list[int] = []

    def version() -> int:
        with app.state.engine.connect() as conn:
            current = library_version(conn)
        first.extend([] if first else [current, snapshot_version(http)])
        assert snapshot_version(http) - first[1] == current - first[0]  # what nodes see moves with it
        return current

    seen = [version()]
    key, new = keys.generate_key(), keys.generate_key()
    _register(http, key)
    seen.append(version())
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="a")).status_code == 201
    seen.append(version())
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="a")).status_code == 409  # refused
    seen.append(version())
    revoke = {"signature": keys.sign(key, revocation_payload("a", 1)).hex()}
    assert http.post("/v1/adapters/a/1/revoke", json=revoke).status_code == 200
    seen.append(version())
    new_hex = keys.public_bytes(new).hex()
    rotate = {"old_key_id": keys.key_id(key), "new_public_key": new_hex,
              "signature": keys.sign(key, rotation_payload(keys.key_id(key), new_hex)).hex()}
    assert http.post("/v1/keys/rotate", json=rotate).status_code == 201
    seen.append(version())
    assert http.post(f"/v1/keys/{keys.key_id(new)}/revoke", headers=AUTH).status_code == 200
    seen.append(version())
    assert seen == [seen[0], seen[0] + 1, seen[0] + 2, seen[0] + 2, seen[0] + 3, seen[0] + 4, seen[0] + 5], seen


def test_retrieval_table_is_cached_by_the_library_version(tmp_path):
    bundle_factory.install_base_card(tmp_path / "data")
    app = create_app(ServerSettings(data_dir=tmp_path / "data", admin_token=ADMIN))
    http = TestClient(app)
    key = keys.generate_key()
    _register(http, key)
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="a", seed=1)).status_code == 201
    query = {"embedding": bundle_factory.unit_vectors(1, bundle_factory.DIM, seed=2)[0],
             "base_fingerprint": bundle_factory.FINGERPRINT, "top_k": 5}
    assert [r["name"] for r in http.post("/v1/retrieve", json=query).json()["results"]] == ["a"]
    # A row written behind the service's back, stamped with the next version but without raising
    # the counter, is not seen ...
    with app.state.engine.begin() as conn:
        conn.execute(insert(Adapter), [with_summary({
            "name": "b", "version": 1, "publisher_key_id": keys.key_id(key), "manifest_sha256": "0" * 64,
            "base_fingerprint": bundle_factory.FINGERPRINT, "domain": "", "sample_count": 64,
            "centroids": canonical_json([query["embedding"]]).decode(), "changed_in": library_version(conn) + 1})])
    assert [r["name"] for r in http.post("/v1/retrieve", json=query).json()["results"]] == ["a"]
    # ... until the next change raises it: then the table is updated with the names changed since.
    assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name="c", seed=3)).status_code == 201
    assert {r["name"] for r in http.post("/v1/retrieve", json=query).json()["results"]} == {"a", "b", "c"}


def test_migration_0005_seeds_the_counter_with_the_version_it_replaces(tmp_path: Path):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
        conn.execute(insert(Publisher), [
            {"key_id": f"{i:016x}", "public_key": f"{i:064x}", "label": "", "active": i != 2,
             "rotated_to": f"{i + 1:016x}" if i == 0 else None} for i in range(3)])
        conn.execute(insert(Adapter), [
            {"id": 7 + i, "name": f"n{i}", "version": 1, "publisher_key_id": f"{i % 3:016x}", "manifest_sha256": "0",
             "base_fingerprint": "f", "domain": "", "sample_count": 1, "centroids": "[[1.0]]",
             "revoked_at": None if i else utcnow()} for i in range(4)])
    upgrade(engine)
    with engine.connect() as conn:
        # max id 10 + 1 revoked version + 3 keys + 1 revoked key + 1 rotated key
        assert library_version(conn) == 10 + 1 + 3 + 1 + 1
    engine.dispose()


@pytest.mark.slow
@pytest.mark.ci_slow  # a migration over more than one fill batch of rows (~9 s): CI runs it in make test-slow
def test_migration_0007_composes_the_summary_of_every_existing_row(tmp_path: Path):
    """Rows stored before the ``summary`` column (more than one fill batch of them, one revoked, one
    with a spread) list exactly as the model path builds them after the upgrade."""
    import json

    from alembic import command

    data_dir = tmp_path / "d"
    url = f"sqlite:///{data_dir / 'registry.db'}"
    data_dir.mkdir()
    engine = make_engine(url)
    config = alembic_config()
    n = 5_003  # the migration fills 5,000 rows a batch
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0006")
        conn.execute(insert(Publisher), [{"key_id": "0" * 16, "public_key": "0" * 64, "label": "", "active": True}])
        conn.execute(insert(Adapter), [
            {"name": f"n{i:05d}", "version": 1, "publisher_key_id": "0" * 16, "manifest_sha256": "e" * 64,
             "base_fingerprint": "f" * 64, "domain": 'quai "nord"' if i == 1 else "", "sample_count": 60 + i,
             "centroids": f"[[{i}.5,-1]]", "spread": "[0.1,0.2,0.3]" if i == 2 else None,
             "created_at": utcnow(), "revoked_at": utcnow() if i == 0 else None} for i in range(n)])
    upgrade(engine)
    engine.dispose()
    service = create_app(ServerSettings(data_dir=data_dir)).state.service
    versions = [json.loads(page.items[0]) for page in (service.adapter_versions(f"n{i:05d}", as_json=True)
                                                       for i in (0, 1, 2, n - 1))]
    models = [service.adapter_versions(f"n{i:05d}").items[0] for i in (0, 1, 2, n - 1)]
    assert versions == [m.model_dump(mode="json") for m in models]
    assert versions[0]["revoked"] and versions[1]["domain"] == 'quai "nord"' and versions[2]["spread"] == [0.1, 0.2, 0.3]
    assert versions[3]["centroids"] == [[n - 0.5, -1.0]]
    listed = [json.loads(item) for item in service.list_adapters(limit=500, as_json=True).items]
    assert listed == [m.model_dump(mode="json") for m in service.list_adapters(limit=500).items]
    assert [item["name"] for item in listed[:2]] == ["n00001", "n00002"]  # n00000 is revoked


def test_a_sqlite_downgrade_and_upgrade_keep_every_adapter_s_files(tmp_path: Path):
    """Downgrading past 0006 rebuilds ``adapters`` in SQLite's batch mode (copy, drop, rename).
    With foreign keys on, the drop would delete every ``adapter_files`` row; migrations run with
    them off, and the pool's connections have them on again afterwards."""
    from alembic import command
    from sqlalchemy import text

    data_dir = tmp_path / "d"
    bundle_factory.install_base_card(data_dir)
    url = f"sqlite:///{data_dir / 'registry.db'}"
    with TestClient(create_app(ServerSettings(data_dir=data_dir, admin_token=ADMIN))) as http:
        key = keys.generate_key()
        _register(http, key)
        for i, name in enumerate(NAMES[:2]):
            assert _upload(http, bundle_factory.make_bundle_files(tmp_path, key, name=name, seed=i)).status_code == 201
    engine = make_engine(url)

    def file_rows() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM adapter_files")).scalar_one()

    stored = file_rows()
    assert stored >= 2 * 4
    command.downgrade(alembic_config(url), "0005")
    assert file_rows() == stored
    upgrade(engine)
    assert file_rows() == stored
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
    with TestClient(create_app(ServerSettings(data_dir=data_dir, admin_token=ADMIN))) as http:
        assert http.get(f"/v1/adapters/{NAMES[0]}/1/manifest").status_code == 200


def test_web_library_and_keys_pages_link_to_the_next_page(library, monkeypatch):
    import re

    from semla.server import web

    http, _ = library
    monkeypatch.setattr(web, "PAGE_SIZE", 2)
    shown, url = [], "/"
    for _ in range(5):
        page = http.get(url)
        assert page.status_code == 200
        shown += re.findall(r'<a href="/adapters/([a-z]+)"><strong>', page.text)
        more = re.search(r'<a rel="next" href="([^"]+)"', page.text)
        if more is None:
            break
        url = more.group(1).replace("&amp;", "&")
    assert shown == NAMES
    fog = http.get("/", params={"q": "fog"}).text  # searched in the database, paged the same way
    assert re.findall(r'<a href="/adapters/([a-z]+)"><strong>', fog) == ["alpha", "charlie"]
    assert 'rel="next"' in fog and "q=fog" in fog
    bad = http.get("/", params={"after": "garbage"})
    assert bad.status_code == 400 and "invalid cursor" in bad.text
    keys_page = http.get("/keys").text
    assert keys_page.count("<tr id=") == 2 and 'rel="next"' in keys_page
    assert http.get("/keys", params={"after": "garbage"}).status_code == 400


@pytest.mark.parametrize("spread, revoked, domain", [
    (None, False, "fog roads"),
    ("[0.125,0.5,1e-05]", True, 'quai "nord" — brouillard\\n\u00e9t\u00e9 \U0001f301'),
])
def test_listing_json_is_composed_equal_to_the_summary_model(spread, revoked, domain):
    """The listing's items are composed from the stored JSON text (nothing parsed): they must read back
    exactly as the AdapterSummary the model path builds, quotes, escapes, non-ASCII and spread included."""
    import json
    from datetime import datetime
    from types import SimpleNamespace

    from semla.server.service.library import _summary, compose_summary

    row = SimpleNamespace(name="a.b-c_1", version=7, publisher_key_id="0123456789abcdef", base_fingerprint="f" * 64,
                          domain=domain, sample_count=123, manifest_sha256="e" * 64,
                          centroids="[[0.6,-0.8],[1,0],[1.5e-07,0.25]]", spread=spread,
                          created_at=datetime(2026, 3, 4, 5, 6, 7), revoked_at=datetime(2026, 3, 5) if revoked else None)
    assert json.loads(compose_summary(row)) == json.loads(_summary(row).model_dump_json())


@pytest.mark.parametrize("descending", [False, True])
def test_a_sqlite_listing_page_read_as_one_aggregate_row_equals_its_rows(library, descending):
    """On SQLite a listing page is read as one row of aggregates and split again: the same names
    and summaries in the same order as reading its rows (in the other order the names do not
    ascend, and with a newline in each summary they split into too many: either way the rows are
    read one by one, the same answer). A page past the end is empty."""
    from semla.server.service.library import _newest_live
    from semla.server.service.reading import _sqlite_aggregate, _sqlite_summary_rows

    service = library[0].app.state.service
    order = Adapter.name.desc() if descending else Adapter.name
    with service._reads() as conn:
        assert conn.dialect.name == "sqlite"
        for page, params, count in [
            (_newest_live().order_by(order).limit(4).with_only_columns(Adapter.name, Adapter.summary), None, 4),
            (_newest_live().order_by(order).limit(4).with_only_columns(
                Adapter.name, (Adapter.summary + "\n").label("summary")), None, 4),
            (_newest_live(after=True).order_by(Adapter.name).limit(3)
             .with_only_columns(Adapter.name, Adapter.summary), {"after": "zulu"}, 0),
        ]:
            rows = conn.execute(page, params).all()
            read = _sqlite_summary_rows(conn, page, _sqlite_aggregate(page), params)
            assert [(r.name, r.summary) for r in read] == [(r.name, r.summary) for r in rows]
            assert len(rows) == count


def test_listing_routes_answer_what_the_service_models_say(library):
    http, _ = library
    service = http.app.state.service
    for path, models in [("/v1/adapters", service.list_adapters(limit=100).items),
                         ("/v1/adapters/echo", service.adapter_versions("echo", limit=100).items)]:
        assert http.get(path).json() == [m.model_dump(mode="json") for m in models]
