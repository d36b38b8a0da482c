"""Registry under load with 100k adapters, SQLite and PostgreSQL, beside a trivial endpoint.

Fills a registry with N synthetic adapters (real signed manifests by a few keys, no training;
the LoRA weights and config are one shared blob each, as identical files are stored once),
starts ``semla-server`` on loopback, and drives each endpoint with concurrent client threads:
``GET /healthz`` (the trivial endpoint), ``GET /v1/adapters?name=`` (one adapter), the manifest
fetch, ``POST /v1/retrieve`` (brute force over N centroids), plus a few requests of the full
listing (N entries) and of the TUF timestamp. Results: benchmarks/results/server.json.

    python benchmarks/server_load.py                 # 100k adapters, SQLite and PostgreSQL
    python benchmarks/server_load.py --n 5000 --backends sqlite   # quick
    python benchmarks/server_load.py --metrics-overhead --n 5000  # cost of /metrics (SQLite)

``--metrics-overhead`` starts two servers on the same filled SQLite registry, one with
``SEMLA_METRICS=false``, and drives ``GET /healthz`` and ``GET /v1/adapters?name=`` through three
arms in interleaved rounds: no metrics; metrics on, never scraped; metrics on and scraped every
``--scrape-interval`` seconds. It records req/s per round and arm, the medians and the overhead in
percent under the key ``registry`` of benchmarks/results/metrics_overhead.json (other keys kept).
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
from _overhead import record_overhead, run_arms, summarize  # noqa: E402

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
from semla.server.service.library import with_summary  # noqa: E402

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
        batch_rows.append(with_summary({
            "id": i + 1, "name": manifest.name, "version": 1, "publisher_key_id": manifest.publisher,
            "manifest_sha256": m_sha, "base_fingerprint": bundle_factory.FINGERPRINT, "domain": manifest.domain,
            "sample_count": manifest.sample_count, "centroids": canonical_json(manifest.centroids.vectors).decode()}))
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
    latencies, wall = timed_calls(fn, clients, requests)
    return {"requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2)}


def timed_calls(fn, clients: int, requests: int) -> tuple[list[float], float]:
    """``requests`` calls of ``fn(client)`` over ``clients`` threads: (latencies in ms, wall seconds)."""
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
    return latencies, time.perf_counter() - t0


def start_server(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [SERVER, "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port), "--admin-token", TOKEN]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SEMLA_UPLOADS_PER_MINUTE": "0", **env})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=300)
    except BaseException:
        proc.terminate()
        raise
    return proc, base


def run_backend(name: str, url: str | None, n: int, clients: int, requests: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix=f"semla-load-{name}-"))
    db_url = url or f"sqlite:///{data_dir / 'registry.db'}"
    fill_s = fill(db_url, data_dir, n)
    proc, base = start_server(data_dir, {"SEMLA_DATABASE_URL": url} if url else {})
    try:
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
        out["tuf_timestamp"] = drive(lambda h: h.get(base + "/tuf/metadata/timestamp.json"), clients, requests)
        trivial = out["trivial_healthz"]["req_per_s"]
        for k in ("get_one_adapter", "manifest_fetch", "retrieve", "full_listing", "tuf_timestamp"):
            out[k]["share_of_trivial_req_per_s"] = round(out[k]["req_per_s"] / trivial, 3)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metrics_overhead(n: int, clients: int, requests: int, rounds: int, interval: float) -> dict:
    """Interleaved rounds of the same load: no metrics / metrics on / metrics on and scraped."""
    data_dir = Path(tempfile.mkdtemp(prefix="semla-load-metrics-"))
    fill(f"sqlite:///{data_dir / 'registry.db'}", data_dir, n)
    names = iter([f"adapter-{int(i):06d}" for i in np.random.default_rng(1).integers(0, n, 20 * rounds * requests)])
    endpoints = {"healthz": lambda base: lambda h: h.get(base + "/healthz"),
                 "get_one_adapter": lambda base: lambda h: h.get(base + "/v1/adapters", params={"name": next(names)})}
    off_proc, off = start_server(data_dir, {"SEMLA_METRICS": "false"})  # creates the registry key first
    results = {}
    try:
        on_proc, on = start_server(data_dir, {})
        try:
            targets = {"no_metrics": (off, off_proc.pid), "metrics": (on, on_proc.pid),
                       "metrics_scraped": (on, on_proc.pid)}
            for ep, make in endpoints.items():
                for base in (off, on):
                    drive(make(base), clients, clients * 4)  # warm connections and caches

                def one_round(base: str, make=make) -> tuple[float, int]:
                    row = drive(make(base), clients, requests)
                    return row["req_per_s"], row["requests"]

                measured = run_arms(targets, one_round, rounds=rounds, interval=interval, label=f"{ep} ")
                results[ep] = summarize(measured, requests // clients * clients, interval)
            sample = httpx.get(on + "/metrics").text
        finally:
            on_proc.terminate()
            on_proc.wait(timeout=30)
    finally:
        off_proc.terminate()
        off_proc.wait(timeout=30)
    return {
        "what": "the registry (semla-server, SQLite, one uvicorn process each) under the same load in three arms: "
                "no_metrics = a server started with SEMLA_METRICS=false; metrics = one with metrics on, not "
                "scraped; metrics_scraped = the same server while a client thread GETs /metrics every "
                f"{interval:g} s. Both servers share one filled data dir and run side by side (one idle while "
                "the other is driven); rounds interleave the arms (order reversed every other round) and medians "
                "over rounds are compared. throughput = req/s (wall clock, sensitive to whatever else runs on "
                "the shared cores); server_cpu = the server process's user+system CPU ms per request (psutil), "
                "far less sensitive to other load. overhead_pct > 0 means the arm is worse than no_metrics.",
        "config": {"adapters": n, "clients": clients, "requests_per_round": requests, "rounds": rounds,
                   "scrape_interval_s": interval, "backend": "sqlite", "metrics_bytes": len(sample.encode())},
        "endpoints": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/server.json; with --metrics-overhead "
                        "benchmarks/results/metrics_overhead.json, key registry)")
    parser.add_argument("--metrics-overhead", action="store_true", help="measure what /metrics costs (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --metrics-overhead (default 5)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between scrapes in --metrics-overhead (default 1)")
    args = parser.parse_args(argv)
    command = ("python benchmarks/server_load.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "note": "servers and load clients share the same 2 cores"}
    if args.metrics_overhead:
        t0 = time.perf_counter()
        result = metrics_overhead(args.n, args.clients, args.requests, args.rounds, args.scrape_interval)
        result.update(command=command, machine=machine, seconds=round(time.perf_counter() - t0, 1))
        for ep, summary in result["endpoints"].items():
            print(f"{ep}: req/s {summary['throughput']}; server CPU per request {summary['server_cpu']}", flush=True)
        print(f"wrote {record_overhead(args.out, 'registry', result)} (key registry)")
        return 0
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
    doc = {"command": command, "machine": machine, "results": results}
    (args.out or ROOT / "benchmarks" / "results" / "server.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
