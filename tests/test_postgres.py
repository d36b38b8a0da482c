"""The registry on a real PostgreSQL server: upload flow, Alembic migrations, two stateless replicas.

One throwaway cluster per module (``tests/pg.py``; skipped with a reason when PostgreSQL's
server binaries are not installed), a fresh database per test. The migration tests at the end
need no cluster: they check the same revision rules on the embedded SQLite default.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import bundle_factory
import httpx
import pg
from tuf_view import snapshot_version
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from semla.registry import keys
from semla.registry.net import free_port
from semla.registry.bundle import verify_bundle
from semla.schemas import BUNDLE_FILES, MANIFEST_FILE
from semla.server import ServerSettings, create_app
from semla.server.local import wait_healthy
from semla.server.db import (
    Adapter,
    AdapterFile,
    Base,
    Publisher,
    alembic_config,
    autocommit_reads,
    current_revision,
    head_revision,
    make_engine,
    make_sessionmaker,
    upgrade,
)

ADMIN = "pg-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SERVER = Path(sys.executable).with_name("semla-server")


# -- fixtures and helpers -------------------------------------------------------------------------
def first_release_tables(engine) -> None:
    """The tables as the first release's ``create_all`` made them: revision 0001, unstamped."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    command.upgrade(config, "0001")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))


def register(client, key) -> None:
    resp = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": "pg"}, headers=AUTH)
    assert resp.status_code == 201, resp.text


def upload(client, files: dict[str, bytes]) -> httpx.Response:
    return client.post("/v1/adapters", files={n: (n, d, "application/octet-stream") for n, d in files.items()})


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text


def state(url: str, blob_root: Path) -> dict:
    """Row counts per table and every file under the blob store."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = {t.__tablename__: conn.scalar(select(func.count()).select_from(t)) for t in (Publisher, Adapter, AdapterFile)}
    finally:
        engine.dispose()
    files = sorted(str(p.relative_to(blob_root)) for p in blob_root.rglob("*") if p.is_file()) if blob_root.exists() else []
    return {"rows": rows, "files": files}


def run_server_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMLA_")}
    return subprocess.run([str(SERVER), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def assert_refused_start(url: str, data_dir: Path, fragment: str) -> None:
    """``semla-server`` on this database exits 2 with one line (it never starts listening)."""
    proc = run_server_cli("--data-dir", str(data_dir), "--database-url", url, "--host", "127.0.0.1",
                          "--port", str(free_port()))
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semla-server: error:"), proc.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# -- (a) the upload flow on PostgreSQL ------------------------------------------------------------
def test_upload_list_fetch_and_refusals_on_postgres(pg_url, tmp_path):
    upgrade(pg_url)
    data_dir = tmp_path / "data"
    settings = ServerSettings(data_dir=data_dir, database_url=pg_url, admin_token=ADMIN)
    bundle_factory.install_base_card(data_dir)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.engine.dialect.name == "postgresql"
        owner, stranger = keys.generate_key(), keys.generate_key()
        register(client, owner)
        register(client, stranger)

        v1 = bundle_factory.make_bundle_files(tmp_path, owner, name="city-streets", version=1, domain="urban streets")
        resp = upload(client, v1)
        assert resp.status_code == 201, resp.text
        assert resp.json()["manifest_sha256"] == hashlib.sha256(v1[MANIFEST_FILE]).hexdigest()
        v2 = bundle_factory.make_bundle_files(tmp_path, owner, name="city-streets", version=2, seed=5,
                                              domain="rainy city")
        assert upload(client, v2).status_code == 201
        other = bundle_factory.make_bundle_files(tmp_path, owner, name="night-roads", version=1, seed=9,
                                                 domain="Night driving")
        assert upload(client, other).status_code == 201

        listing = client.get("/v1/adapters").json()
        assert [(a["name"], a["version"]) for a in listing] == [("city-streets", 2), ("night-roads", 1)]
        assert all(a["created_at"].endswith("Z") and a["publisher"] == keys.key_id(owner) for a in listing)
        assert [a["version"] for a in client.get("/v1/adapters/city-streets").json()] == [2, 1]
        assert [a["name"] for a in client.get("/v1/adapters", params={"domain": "NIGHT"}).json()] == ["night-roads"]
        assert client.get("/v1/adapters", params={"domain": "urban"}).json() == []  # v1's domain, not the newest
        for version, files in ((1, v1), (2, v2)):
            fetched = {n: client.get(f"/v1/adapters/city-streets/{version}/files/{n}").content for n in BUNDLE_FILES}
            assert fetched == files
            verify_bundle(fetched, {keys.key_id(owner): keys.public_bytes(owner)})
        assert client.get("/v1/adapters/city-streets/1/manifest").content == v1[MANIFEST_FILE]
        query = listing[1]["centroids"][0]
        hits = client.post("/v1/retrieve", json={"embedding": query, "base_fingerprint": bundle_factory.FINGERPRINT,
                                                 "top_k": 2}).json()["results"]
        assert hits[0]["name"] == "night-roads"

        # Refusals leave no rows and no blobs behind.
        before = state(pg_url, data_dir / "blobs")
        v3 = bundle_factory.make_bundle_files(tmp_path, owner, name="city-streets", version=3, seed=11)
        assert_error(upload(client, bundle_factory.flip_byte(v3)), 422, "hash_mismatch")
        assert_error(upload(client, bundle_factory.edit_manifest(v3, lambda m: m.update(domain="x"))), 403, "bad_signature")
        assert_error(upload(client, v1), 409, "stale_version")
        taken = bundle_factory.make_bundle_files(tmp_path, stranger, name="city-streets", version=9, seed=12)
        assert_error(upload(client, taken), 409, "name_taken")
        unknown = bundle_factory.make_bundle_files(tmp_path, keys.generate_key(), name="fresh", version=1, seed=13)
        assert_error(upload(client, unknown), 403, "unknown_key")
        assert state(pg_url, data_dir / "blobs") == before
        assert before["rows"] == {"publishers": 2, "adapters": 3, "adapter_files": 12}
        # ... and the tampered version is still publishable untampered.
        assert upload(client, v3).status_code == 201


# -- (b) migrations -------------------------------------------------------------------------------
def test_db_upgrade_creates_the_head_schema_in_an_empty_database(pg_url, tmp_path):
    proc = run_server_cli("db", "upgrade", "--database-url", pg_url)
    assert proc.returncode == 0, proc.stderr
    assert f"to {head_revision()} (head)" in proc.stdout
    engine = make_engine(pg_url)
    try:
        assert current_revision(engine) == head_revision()
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as conn:  # the migrations build exactly the ORM's tables
            assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []
    finally:
        engine.dispose()
    again = run_server_cli("db", "upgrade", "--database-url", pg_url)
    assert again.returncode == 0 and "already at schema revision" in again.stdout, again.stderr
    assert not (tmp_path / "semla-data").exists() and not Path("semla-data").exists()


def test_migration_0007_composes_existing_summaries_and_then_requires_one(pg_url):
    import json

    from alembic import command
    from sqlalchemy import insert, inspect

    from semla.server.db import utcnow
    from semla.server.service.library import ROW_COLUMNS, _summary

    command.upgrade(alembic_config(pg_url), "0006")
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Publisher), [{"key_id": "0" * 16, "public_key": "0" * 64, "label": "", "active": True}])
            conn.execute(insert(Adapter), [
                {"name": f"n{i}", "version": 1, "publisher_key_id": "0" * 16, "manifest_sha256": "e" * 64,
                 "base_fingerprint": "f" * 64, "domain": "d\u00e9", "sample_count": 60, "centroids": "[[0.6,0.8]]",
                 "spread": "[0.1,0.2,0.3]" if i else None, "created_at": utcnow(),
                 "revoked_at": None if i else utcnow()} for i in range(3)])
        upgrade(engine)
        assert not {c["name"]: c for c in inspect(engine).get_columns("adapters")}["summary"]["nullable"]
        with engine.connect() as conn:
            rows = conn.execute(select(*ROW_COLUMNS, Adapter.summary).order_by(Adapter.name)).all()
        assert [json.loads(row.summary) for row in rows] == [_summary(row).model_dump(mode="json") for row in rows]
        assert [json.loads(row.summary)["revoked"] for row in rows] == [True, False, False]
    finally:
        engine.dispose()


def test_migration_0009_keeps_each_summary_in_its_row_and_moves_the_centroids_out(pg_url):
    """At 64-d centroids a row is too long for PostgreSQL to keep whole: before ``0009`` the
    summary (the longer text) went to the TOAST relation, after it the centroids go there, for
    the rows stored before (rewritten) and after (written so)."""
    import json
    import random

    from alembic import command
    from sqlalchemy import insert

    from semla.server.db import utcnow
    from semla.server.service.library import compose_summary

    rng = random.Random(0)

    def rows(first: int) -> list[dict]:
        out = []
        for i in range(first, first + 3):
            row = {"name": f"n{i}", "version": 1, "publisher_key_id": "0" * 16, "manifest_sha256": "e" * 64,
                   "base_fingerprint": "f" * 64, "domain": "d", "sample_count": 60, "spread": None,
                   "centroids": json.dumps([[rng.uniform(-0.2, 0.2) for _ in range(64)]]),
                   "created_at": utcnow(), "revoked_at": None}
            out.append({**row, "summary": compose_summary(SimpleNamespace(**row))})
        return out

    def out_of_line_bytes(conn) -> tuple[int, int, int]:
        """(bytes in the TOAST relation, of every summary, of every centroids text)."""
        toast = conn.scalar(text("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'adapters'::regclass"))
        return (conn.scalar(text(f"SELECT coalesce(sum(octet_length(chunk_data)), 0) FROM {toast}")),
                conn.scalar(text("SELECT sum(octet_length(summary)) FROM adapters")),
                conn.scalar(text("SELECT sum(octet_length(centroids)) FROM adapters")))

    command.upgrade(alembic_config(pg_url), "0008")
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Publisher), [{"key_id": "0" * 16, "public_key": "0" * 64, "label": "", "active": True}])
            conn.execute(insert(Adapter), rows(0))
        with engine.connect() as conn:
            toasted, summaries, centroids = out_of_line_bytes(conn)
        assert toasted == summaries > centroids
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(insert(Adapter), rows(3))
        with engine.connect() as conn:
            toasted, summaries, centroids = out_of_line_bytes(conn)
            stored = conn.execute(select(Adapter.name, Adapter.summary).order_by(Adapter.name)).all()
        assert toasted == centroids < summaries
        assert [json.loads(summary)["name"] for _, summary in stored] == [f"n{i}" for i in range(6)]
    finally:
        engine.dispose()


def test_server_refuses_an_empty_postgres_database(pg_url, tmp_path):
    assert_refused_start(pg_url, tmp_path / "d", "semla-server db upgrade")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:  # it did not create anything itself
            assert conn.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")) == 0
    finally:
        engine.dispose()


def test_server_and_upgrade_refuse_an_unknown_revision(pg_url, tmp_path):
    upgrade(pg_url)
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    engine.dispose()
    assert_refused_start(pg_url, tmp_path / "d", "f00dfeed9999")
    proc = run_server_cli("db", "upgrade", "--database-url", pg_url)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not know" in proc.stderr


def test_a_database_made_before_migrations_is_refused_then_adopted(pg_url, tmp_path):
    engine = make_engine(pg_url)
    first_release_tables(engine)  # what the server did before Alembic
    assert_refused_start(pg_url, tmp_path / "d", "semla-server db upgrade")
    upgrade(engine)  # stamps the initial revision instead of failing on existing tables
    assert current_revision(engine) == head_revision()
    engine.dispose()


# -- (c) two stateless replicas on one database and one blob store --------------------------------
def _start_replica(url: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SEMLA_")}, "SEMLA_ADMIN_TOKEN": ADMIN}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(SERVER), "--data-dir", str(data_dir), "--database-url", url, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 120) -> None:
    wait_healthy(base, proc, timeout=timeout, log=log)


def test_two_replicas_share_one_database_and_one_blob_store(pg_url, tmp_path):
    upgrade(pg_url)
    shared = tmp_path / "shared"
    bundle_factory.install_base_card(shared)
    replicas = [_start_replica(pg_url, shared, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for i, (proc, base) in enumerate(replicas):
            _wait_healthy(proc, base, tmp_path / f"replica{i}.log")
        a, b = (base for _, base in replicas)
        key = keys.generate_key()
        resp = httpx.post(a + "/v1/keys", json={"public_key": keys.public_bytes(key).hex()}, headers=AUTH, timeout=30)
        assert resp.status_code == 201, resp.text
        assert [k["key_id"] for k in httpx.get(b + "/v1/keys", timeout=30).json()] == [keys.key_id(key)]
        version_before = snapshot_version(httpx.Client(timeout=30), b)

        # 8 concurrent uploads: 4 distinct names alternating between replicas, plus two races on
        # one name+version sent to both replicas (identical bytes, and two different bundles).
        jobs: list[tuple[str, str, dict[str, bytes]]] = []
        for i, name in enumerate(["alpha", "bravo", "charlie", "delta"]):
            jobs.append((name, (a, b)[i % 2], bundle_factory.make_bundle_files(tmp_path, key, name=name, version=1, seed=i)))
        same = bundle_factory.make_bundle_files(tmp_path, key, name="race-same", version=1, seed=20)
        jobs += [("race-same", a, same), ("race-same", b, same)]
        for seed, base in ((21, a), (22, b)):
            jobs.append(("race-diff", base, bundle_factory.make_bundle_files(tmp_path, key, name="race-diff", version=1, seed=seed)))
        assert len(jobs) == 8
        gate = threading.Barrier(len(jobs))

        def send(job):
            _, base, files = job
            parts = {n: (n, d, "application/octet-stream") for n, d in files.items()}
            gate.wait(timeout=30)
            return httpx.post(base + "/v1/adapters", files=parts, timeout=60)

        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(send, jobs))

        acked: dict[str, dict[str, bytes]] = {}
        for (name, _, files), resp in zip(jobs, responses):
            if resp.status_code == 201:
                assert name not in acked, f"two uploads of {name} v1 were both acknowledged"
                assert resp.json()["manifest_sha256"] == hashlib.sha256(files[MANIFEST_FILE]).hexdigest()
                acked[name] = files
            else:
                assert name.startswith("race-"), resp.text
                assert_error(resp, 409, "stale_version")
        for race in ("race-same", "race-diff"):
            codes = sorted(r.status_code for (n, _, _), r in zip(jobs, responses) if n == race)
            assert codes == [201, 409], (race, codes)
        assert sorted(acked) == ["alpha", "bravo", "charlie", "delta", "race-diff", "race-same"]
        # The snapshot nodes see rose by exactly one per accepted upload (none for a lost race), on both.
        for base in (a, b):
            version = snapshot_version(httpx.Client(timeout=30), base)
            assert version == version_before + len(acked), (base, version, version_before)

        trusted = {keys.key_id(key): keys.public_bytes(key)}
        for base in (a, b):  # every acknowledged upload, listed and served byte-identical by both
            listing = httpx.get(base + "/v1/adapters", timeout=30).json()
            assert {x["name"]: x["manifest_sha256"] for x in listing} == {
                n: hashlib.sha256(f[MANIFEST_FILE]).hexdigest() for n, f in acked.items()
            }
            for name, files in acked.items():
                fetched = {}
                for filename in BUNDLE_FILES:
                    r = httpx.get(f"{base}/v1/adapters/{name}/1/files/{filename}", timeout=30)
                    assert r.status_code == 200, (base, name, filename, r.text)
                    fetched[filename] = r.content
                assert fetched == files
                assert verify_bundle(fetched, trusted).name == name

        # No orphans: 4 file rows per adapter, every blob referenced, every reference stored.
        engine = make_engine(pg_url)
        try:
            with engine.connect() as conn:
                per_adapter = conn.execute(
                    select(Adapter.name, func.count(AdapterFile.filename))
                    .outerjoin(AdapterFile, AdapterFile.adapter_id == Adapter.id).group_by(Adapter.name)
                ).all()
                referenced = set(conn.scalars(select(AdapterFile.sha256).distinct()))
        finally:
            engine.dispose()
        assert dict(per_adapter) == {name: len(BUNDLE_FILES) for name in acked}
        stored = {p.name for p in (shared / "blobs").rglob("*") if p.is_file()}
        assert stored == referenced  # no loser's blob left, no temp file, nothing missing
        expected = {hashlib.sha256(d).hexdigest() for f in acked.values() for d in f.values()}
        assert referenced == expected
    finally:
        for proc, _ in replicas:
            proc.terminate()
        for proc, _ in replicas:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# -- (d) the connection pools ---------------------------------------------------------------------
def test_a_pooled_connection_is_checked_without_a_round_trip_and_replaced_once_the_server_ends_it(pg_url, cluster):
    """A live pooled connection is handed out with no ping; one the server has ended (as a
    restart or ``pg_terminate_backend`` does) is pinged, found dead and replaced, and the read
    that checked it out succeeds: on the ordinary pool and on the autocommit read pool."""
    backend_pid = text("SELECT pg_backend_pid()")
    admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    for autocommit in (False, True):
        engine = make_engine(pg_url, autocommit=autocommit)
        pings = []
        real_ping = engine.dialect.do_ping
        engine.dialect.do_ping = lambda conn: (pings.append(1), real_ping(conn))[1]
        try:
            with engine.connect() as conn:
                first = conn.scalar(backend_pid)
            with engine.connect() as conn:  # the same connection, alive: no ping
                assert conn.scalar(backend_pid) == first
            assert pings == []
            with admin.connect() as conn:
                assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}) is True
                gone = time.monotonic() + 60
                while conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": first}):
                    assert time.monotonic() < gone, "the terminated backend did not exit"
                    time.sleep(0.05)
            with engine.connect() as conn:  # no error: the dead one is pinged and replaced
                assert conn.scalar(backend_pid) != first
            assert pings == [1]
        finally:
            engine.dispose()
    admin.dispose()


# -- the same revision rules on the embedded SQLite default (no cluster needed) ---------------------
def test_reads_run_in_autocommit_and_leave_the_pool_transactional(pg_url):
    """A read connection runs each statement as its own transaction (one round trip, no BEGIN or
    ROLLBACK); the ordinary sessions on the same pool still hold one transaction across statements.
    The app's own read pool (``make_engine(url, autocommit=True)``) does the same."""
    engine, reads = make_engine(pg_url), make_engine(pg_url, autocommit=True)
    try:
        sessions = make_sessionmaker(engine)
        same_transaction = text("SELECT transaction_timestamp() = statement_timestamp()")
        for _ in range(2):  # the second round gets the pooled connections back
            with autocommit_reads(sessions)() as conn:
                conn.execute(text("SELECT pg_sleep(0.01)"))
                assert conn.scalar(same_transaction) is True
            with sessions() as session:
                session.execute(text("SELECT pg_sleep(0.01)"))
                assert session.scalar(same_transaction) is False
        with reads.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.01)"))
            assert conn.scalar(same_transaction) is True
    finally:
        engine.dispose()
        reads.dispose()


def test_sqlite_default_is_migrated_automatically_and_checked(tmp_path):
    data_dir = tmp_path / "d"
    create_app(ServerSettings(data_dir=data_dir)).state.engine.dispose()  # empty → upgraded to head
    url = f"sqlite:///{data_dir / 'registry.db'}"
    engine = make_engine(url)
    assert current_revision(engine) == head_revision()
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    engine.dispose()
    proc = run_server_cli("--data-dir", str(data_dir), "--port", str(free_port()))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "f00dfeed9999" in proc.stderr and "does not know" in proc.stderr


def test_sqlite_made_before_migrations_needs_db_upgrade(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    engine = make_engine(f"sqlite:///{data_dir / 'registry.db'}")
    first_release_tables(engine)
    engine.dispose()
    proc = run_server_cli("--data-dir", str(data_dir), "--port", str(free_port()))
    assert proc.returncode == 2 and "semla-server db upgrade" in proc.stderr, proc.stderr
    up = run_server_cli("db", "upgrade", "--data-dir", str(data_dir))
    assert up.returncode == 0 and f"to {head_revision()} (head)" in up.stdout, up.stderr
    create_app(ServerSettings(data_dir=data_dir)).state.engine.dispose()  # now it starts
