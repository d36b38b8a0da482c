"""Crash safety: SIGKILL the registry while 8 clients upload, restart it, check every
acknowledged upload is whole and verifies, nothing unacknowledged is half there, and the
orphan sweep clears what the crash left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

import bundle_factory
from semla.registry import keys
from semla.registry.bundle import verify_bundle
from semla.schemas import BUNDLE_FILES
from semla.server.local import free_port, wait_healthy

TOKEN = "crash-test-token"
CLIENTS, PER_CLIENT = 8, 12


SERVER = str(Path(sys.executable).with_name("semla-server"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str | None:
    """None: the embedded SQLite default; else a migrated PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    from semla.server.db import upgrade

    url = request.getfixturevalue("pg_url")
    upgrade(url)
    return url


def start(data_dir: Path, port: int, database: str | None) -> subprocess.Popen:
    db = ["--database-url", database] if database else []
    proc = subprocess.Popen(
        [SERVER, "--data-dir", str(data_dir), *db, "--host", "127.0.0.1", "--port", str(port), "--admin-token", TOKEN],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


@pytest.mark.slow
@pytest.mark.ci_slow  # a real loop: a registry killed mid-upload, restarted, consistent (make test-slow)
def test_sigkill_during_concurrent_uploads(tmp_path, database):
    key = keys.generate_key()
    bundles = {
        (c, v): bundle_factory.make_bundle_files(tmp_path / f"c{c}", key, name=f"owner-{c}", version=v, seed=c * 100 + v)
        for c in range(CLIENTS) for v in range(1, PER_CLIENT + 1)
    }
    data_dir, port = tmp_path / "registry", free_port()
    bundle_factory.install_base_card(data_dir)
    url = f"http://127.0.0.1:{port}"
    proc = start(data_dir, port, database)
    httpx.post(url + "/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
               headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()

    acknowledged: list[tuple[str, int]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=10) as http:
            for v in range(1, PER_CLIENT + 1):
                files = bundles[(c, v)]
                try:
                    r = http.post(url + "/v1/adapters", files=[(n, (n, d)) for n, d in files.items()])
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        acknowledged.append((f"owner-{c}", v))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < CLIENTS * 2 and time.monotonic() < deadline:  # kill mid-stream
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for t in threads:
        t.join(timeout=30)
    assert 0 < len(acknowledged) < CLIENTS * PER_CLIENT, "the kill should land mid-stream"

    proc = start(data_dir, port, database)
    try:
        trusted = {keys.key_id(key): keys.public_bytes(key)}
        stored = set()
        for c in range(CLIENTS):
            r = httpx.get(f"{url}/v1/adapters/owner-{c}")
            versions = [a["version"] for a in r.json()] if r.status_code == 200 else []
            for v in versions:  # everything stored is whole: every file there and verifying
                files = {f: httpx.get(f"{url}/v1/adapters/owner-{c}/{v}/files/{f}").content for f in BUNDLE_FILES}
                verify_bundle(files, trusted)
                assert files == bundles[(c, v)]
                stored.add((f"owner-{c}", v))
        assert set(acknowledged) <= stored  # nothing acknowledged is lost
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    engine = create_engine(database or f"sqlite:///{data_dir / 'registry.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("select count(*) from adapters")).scalar()
        file_rows = conn.execute(text("select count(*) from adapter_files")).scalar()
        referenced = {r[0] for r in conn.execute(text("select sha256 from adapter_files"))}
    engine.dispose()
    assert rows == len(stored) and file_rows == rows * len(BUNDLE_FILES)  # never a partial row

    db = ["--database-url", database] if database else []
    swept = subprocess.run([SERVER, "sweep", "--data-dir", str(data_dir), *db, "--min-age", "0"],
                           capture_output=True, text=True, timeout=60)
    assert swept.returncode == 0 and swept.stdout.startswith("deleted"), swept.stderr
    on_disk = {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
    assert on_disk == referenced  # every blob referenced, every referenced blob present
    print(f"[{database and 'postgresql' or 'sqlite'}] {len(acknowledged)} acknowledged, {len(stored)} stored "
          f"of {CLIENTS * PER_CLIENT} attempted; sweep: {swept.stdout.strip()}")
