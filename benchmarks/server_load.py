"""Registry under load with 100k adapters, SQLite and PostgreSQL, beside a trivial endpoint.

Fills a registry with N synthetic adapters (real signed manifests by a few keys, no training;
the LoRA weights and config are one shared blob each, as identical files are stored once),
starts ``semla-server`` on loopback, and drives each endpoint with concurrent client threads:
``GET /healthz`` (the trivial endpoint), ``GET /v1/adapters?name=`` (one adapter), the manifest
fetch, ``POST /v1/retrieve`` (brute force over N centroids), plus a few requests of the full
listing and of the signed index (N entries each). Results: benchmarks/results/server.json.

    python benchmarks/server_load.py                 # 100k adapters, SQLite and PostgreSQL
    python benchmarks/server_load.py --n 5000 --backends sqlite   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import bundle_factory  # noqa: E402

from semla.registry import keys  # noqa: E402
from semla.registry.bundle import sha256_bytes  # noqa: E402
from semla.schemas import (  # noqa: E402
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    canonical_json,
    signing_payload,
)
from semla.server.db import Adapter, AdapterFile, Publisher, make_engine, upgrade  # noqa: E402
from semla.server.local import free_port, wait_healthy  # noqa: E402

TOKEN = "load-token"
SERVER = str(Path(sys.executable).with_name("semla-server"))


def _put(blob_root: Path, data: bytes) -> str:
    """Write a blob where BlobStore keeps it (no fsync: this is a fixture, not an upload)."""
    digest = sha256_bytes(data)
    path = blob_root / "sha256" / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return digest


def fill(url: str, data_dir: Path, n: int, n_keys: int = 4, dim: int = 64) -> float:
    t0 = time.perf_counter()
    upgrade(url)
    engine = make_engine(url)
    signers = [keys.generate_key() for _ in range(n_keys)]
    weights, config = bundle_factory.lora_weights(), json.dumps(bundle_factory.adapter_config()).encode()
    blob_root = data_dir / "blobs"
    w_sha, c_sha = _put(blob_root, weights), _put(blob_root, config)
    rng = np.random.default_rng(0)
    with engine.begin() as conn:
        conn.execute(insert(Publisher), [{"key_id": keys.key_id(k), "public_key": keys.public_bytes(k).hex(),
                                          "label": f"load {i}", "active": True} for i, k in enumerate(signers)])
    base_fields = bundle_factory.manifest_fields()
    files_meta = {ADAPTER_WEIGHTS_FILE: {"sha256": w_sha, "size": len(weights)},
                  ADAPTER_CONFIG_FILE: {"sha256": c_sha, "size": len(config)}}
    batch_rows, batch_files = [], []
    for i in range(n):
        key = signers[i % n_keys]
        vec = rng.standard_normal(dim)
        vec /= np.linalg.norm(vec)
        fields = {**base_fields, "name": f"adapter-{i:06d}", "publisher": keys.key_id(key), "files": files_meta,
                  "domain": f"domain {i % 97}", "centroids": {"embedding_model": "load", "vectors": [vec.tolist()]}}
        manifest = Manifest.model_validate(fields)
        body = manifest.to_canonical()
        sig = keys.sign(key, signing_payload(manifest))
        m_sha, s_sha = _put(blob_root, body), _put(blob_root, sig)
        batch_rows.append({"id": i + 1, "name": manifest.name, "version": 1, "publisher_key_id": manifest.publisher,
                           "manifest_sha256": m_sha, "base_fingerprint": bundle_factory.FINGERPRINT,
                           "domain": manifest.domain, "sample_count": manifest.sample_count,
                           "centroids": canonical_json(manifest.centroids.vectors).decode()})
        for name, sha, size in ((ADAPTER_WEIGHTS_FILE, w_sha, len(weights)), (ADAPTER_CONFIG_FILE, c_sha, len(config)),
                                (MANIFEST_FILE, m_sha, len(body)), (SIGNATURE_FILE, s_sha, len(sig))):
            batch_files.append({"adapter_id": i + 1, "filename": name, "sha256": sha, "size": size})
        if len(batch_rows) == 5000 or i == n - 1:
            with engine.begin() as conn:
                conn.execute(insert(Adapter), batch_rows)
                conn.execute(insert(AdapterFile), batch_files)
            batch_rows, batch_files = [], []
    engine.dispose()
    return time.perf_counter() - t0


def drive(fn, clients: int, requests: int) -> dict:
    """``requests`` calls of ``fn(client)`` spread over ``clients`` threads; req/s, p50, p99."""
    latencies: list[float] = []
    lock = threading.Lock()
    per = requests // clients

    def worker() -> None:
        with httpx.Client(timeout=120) as http:
            for _ in range(per):
                t0 = time.perf_counter()
                r = fn(http)
                r.raise_for_status()
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2)}


def run_backend(name: str, url: str | None, n: int, clients: int, requests: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix=f"semla-load-{name}-"))
    db_url = url or f"sqlite:///{data_dir / 'registry.db'}"
    fill_s = fill(db_url, data_dir, n)
    port = free_port()
    env = {**os.environ, "SEMLA_UPLOADS_PER_MINUTE": "0"}
    args = [SERVER, "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port), "--admin-token", TOKEN]
    if url:
        args += ["--database-url", url]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        rng = np.random.default_rng(1)
        names = [f"adapter-{int(i):06d}" for i in rng.integers(0, n, 10_000)]
        query = rng.standard_normal(64)
        body = {"embedding": (query / np.linalg.norm(query)).tolist(), "base_fingerprint": bundle_factory.FINGERPRINT}
        pick = iter(names * 10)
        httpx.post(base + "/v1/retrieve", json=body, timeout=120).raise_for_status()  # build the table once
        out = {"backend": name, "adapters": n, "fill_seconds": round(fill_s, 1)}
        out["trivial_healthz"] = drive(lambda h: h.get(base + "/healthz"), clients, requests)
        out["get_one_adapter"] = drive(lambda h: h.get(base + "/v1/adapters", params={"name": next(pick)}),
                                       clients, requests)
        out["manifest_fetch"] = drive(lambda h: h.get(f"{base}/v1/adapters/{next(pick)}/1/manifest"), clients, requests)
        out["retrieve"] = drive(lambda h: h.post(base + "/v1/retrieve", json=body), clients, requests // 4)
        out["full_listing"] = drive(lambda h: h.get(base + "/v1/adapters"), 1, 3)
        out["signed_index"] = drive(lambda h: h.get(base + "/v1/index"), 1, 3)
        trivial = out["trivial_healthz"]["req_per_s"]
        for k in ("get_one_adapter", "manifest_fetch", "retrieve", "full_listing", "signed_index"):
            out[k]["share_of_trivial_req_per_s"] = round(out[k]["req_per_s"] / trivial, 3)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server.json")
    args = parser.parse_args(argv)
    results = []
    for backend in args.backends.split(","):
        if backend == "sqlite":
            results.append(run_backend("sqlite", None, args.n, args.clients, args.requests))
        else:
            import pg

            with pg.cluster() as cluster:
                results.append(run_backend("postgresql", cluster.create_database("load"), args.n, args.clients,
                                           args.requests))
        print(json.dumps(results[-1], indent=1), flush=True)
    doc = {"command": ("python benchmarks/server_load.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "note": "server and load clients share the same 2 cores"},
           "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
