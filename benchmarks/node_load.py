"""Load on the node's HTTP service: throughput and latency per max_batch, benchmarks/results/node_load.json.

Everything on loopback: a registry (in this process) with three adapters (fog, night, rain;
trained for a few steps: only speed is measured here), then for each max_batch the real
``semla-node serve`` handler in a subprocess, driven by concurrent client threads that post
one image per request, with a vocabulary of 8 classes. Reported per max_batch: images/s,
request latency p50/p90/p99, the batch sizes the service actually formed and its mean queue
and compute time per image.

    python benchmarks/node_load.py            # 16 clients, 200 images, max_batch 1, 4, 16
    python benchmarks/node_load.py --quick    # 8 clients, 48 images, max_batch 1, 8 (-> /tmp)
    python benchmarks/node_load.py --metrics-overhead   # cost of /metrics (-> results/metrics_overhead.json)

``--metrics-overhead`` starts two services side by side (one with ``--no-metrics``) and drives
the same load in interleaved rounds through three arms: no metrics; metrics on, never scraped;
metrics on and scraped every ``--scrape-interval`` seconds by a concurrent client. It records
images/s per round and arm, the medians and the overhead in percent (key ``node`` of
benchmarks/results/metrics_overhead.json; other keys of that file are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from _overhead import record_overhead, run_arms, summarize
from semla.server.local import free_port, wait_healthy  # noqa: E402
from semla.registry import keys, synth
from semla.registry.http import RegistryClient
from semla.registry.model import load_base
from semla.registry.train import TrainConfig, train_adapter

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("fog", "night", "rain")
CLASSES = "sky,road,sidewalk,building,vegetation,car,person,pole"
TOKEN = "bench-token"

#: ``semla-node serve`` through the same parser and runner the CLI uses (works before it is wired in).
_SERVE = (
    "import argparse, sys\n"
    "from semla.registry.cli_common import run\n"
    "from semla.registry.serve import add_parser\n"
    "p = argparse.ArgumentParser(prog='semla-node')\n"
    "add_parser(p.add_subparsers(dest='command'))\n"
    "sys.exit(run(p, sys.argv[1:], lambda a: a.func(a)))\n"
)


def start_registry(data_dir: Path) -> tuple[str, uvicorn.Server, threading.Thread]:
    from semla.server import ServerSettings, create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN)),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


def publish_adapters(url: str, workdir: Path, steps: int) -> None:
    from semla.client.publish import publish_bundle

    base = load_base()
    key = keys.generate_key()
    client = RegistryClient(url)
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    for i, domain in enumerate(DOMAINS):
        data = synth.write_dataset(domain, 50, i, workdir / f"{domain}-data")
        train_adapter(data, workdir / domain, domain, TrainConfig(steps=steps, lr=5e-3, seed=i), base=base,
                      progress=False)
        publish_bundle(workdir / domain, client, key=key)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def start_node(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, *argv], stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc


def drive(url: str, images: list[tuple[str, bytes]], clients: int, per_request: int) -> dict:
    """Post every image (``per_request`` per request) from ``clients`` threads; time each request."""
    work: queue.Queue = queue.Queue()
    for start in range(0, len(images), per_request):
        work.put(images[start : start + per_request])
    latencies: list[float] = []
    rows: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    return
                files = [("images", (name, data, "image/png")) for name, data in chunk]
                t = time.perf_counter()
                r = http.post(url + "/v1/segment", files=files, data={"classes": CLASSES})
                elapsed = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    latencies.append(elapsed * 1000)
                    rows.extend(res["timings_ms"] for res in r.json()["results"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    lat = np.asarray(latencies)
    return {
        "images": len(rows), "requests": len(latencies), "seconds": round(wall, 3),
        "images_per_s": round(len(rows) / wall, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p90": round(float(np.percentile(lat, 90)), 1),
                       "p99": round(float(np.percentile(lat, 99)), 1), "mean": round(float(lat.mean()), 1)},
        "mean_batch_size": round(statistics.fmean(r["batch_size"] for r in rows), 2),
        "max_batch_size_seen": max(r["batch_size"] for r in rows),
        "mean_queue_ms": round(statistics.fmean(r["queue"] for r in rows), 2),
        "mean_compute_ms_per_batch": round(statistics.fmean(r["compute"] for r in rows), 2),
    }


@contextlib.contextmanager
def serve_node(registry: str, workdir: Path, max_batch: int, max_wait_ms: float, *extra: str,
               tag: str = "") -> Iterator[tuple[str, int]]:
    """``semla-node serve`` on a free port in a subprocess (its own cache dir); yields (URL, pid)."""
    port = free_port()
    name = f"{max_batch}{tag}"
    argv = ["serve", "--registry", registry, "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch),
            "--max-wait-ms", f"{max_wait_ms:g}", "--refresh-seconds", "0", "--cache-dir",
            str(workdir / f"cache-{name}"), *extra]
    log = workdir / f"node-{name}.log"
    proc = start_node(argv, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=600, log=log)  # importing torch on a busy machine takes minutes
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metrics_overhead(registry: str, args: argparse.Namespace, images: list[tuple[str, bytes]],
                     warmup: list[tuple[str, bytes]], clients: int, max_batch: int) -> dict:
    """Interleaved rounds of the same load: no metrics / metrics on / metrics on and scraped."""
    def one_round(url: str) -> tuple[float, int]:
        row = drive(url, images, clients, args.per_request)
        return row["images_per_s"], row["images"]

    with serve_node(registry, args.workdir, max_batch, args.max_wait_ms, "--no-metrics", tag="-off") as off, \
            serve_node(registry, args.workdir, max_batch, args.max_wait_ms, tag="-on") as on:
        for url, _ in (off, on):
            drive(url, warmup * 4, len(warmup), 1)
        measured = run_arms({"no_metrics": off, "metrics": on, "metrics_scraped": on}, one_round,
                            rounds=args.rounds, interval=args.scrape_interval)
        sample = httpx.get(on[0] + "/metrics").text
    summary = summarize(measured, len(images), args.scrape_interval)
    summary["scrapes"]["bytes"] = len(sample.encode())
    print(f"images/s {summary['throughput']}; server CPU per image {summary['server_cpu']}", flush=True)
    return {
        "what": "POST /v1/segment (semla-node serve, CPU, one image per request) under the same load in three "
                "arms: no_metrics = a service started with --no-metrics; metrics = one with metrics on, not "
                "scraped; metrics_scraped = the same service while a client thread GETs /metrics every "
                f"{args.scrape_interval:g} s. Both services run side by side (one idle while the other is "
                "driven); rounds interleave the arms (order reversed every other round) and medians over rounds "
                "are compared. throughput = images/s (wall clock, sensitive to whatever else runs on the shared "
                "cores); server_cpu = the service process's user+system CPU ms per image (psutil), far less "
                "sensitive to other load. overhead_pct > 0 means the arm is worse than no_metrics.",
        "config": {"clients": clients, "images_per_round": len(images), "per_request": args.per_request,
                   "max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "rounds": args.rounds,
                   "scrape_interval_s": args.scrape_interval, "adapters": list(DOMAINS)},
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (8 clients, 48 images, max_batch 1 and 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/node_load.json; with --quick "
                        "/tmp/node_load_quick.json; with --metrics-overhead benchmarks/results/metrics_overhead.json)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-node-load"))
    parser.add_argument("--clients", type=int, default=None, help="concurrent client threads (default 16; quick 8)")
    parser.add_argument("--images", type=int, default=None, help="images per max_batch setting (default 200; quick 48)")
    parser.add_argument("--per-request", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--max-batches", default=None, help="comma-separated max_batch values (default 1,4,16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the service's max_wait_ms (default 10)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per adapter (speed only; default 8)")
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="measure what /metrics costs instead (at the largest --max-batches value; see above)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --metrics-overhead (default 5)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between scrapes in --metrics-overhead (default 1)")
    args = parser.parse_args(argv)
    clients = args.clients or (8 if args.quick else 16)
    n_images = args.images or (48 if args.quick else 200)
    max_batches = [int(b) for b in (args.max_batches or ("1,8" if args.quick else "1,4,16")).split(",")]
    out = args.out
    if not args.metrics_overhead:
        out = out or (Path("/tmp/node_load_quick.json") if args.quick else ROOT / "benchmarks/results/node_load.json")

    t0 = time.perf_counter()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    registry, reg_server, reg_thread = start_registry(args.workdir / "registry")
    publish_adapters(registry, args.workdir, args.steps)
    images = [(f"{d}-{i}.png", png(synth.render(d, 777, i)[0])) for i in range(n_images // len(DOMAINS) + 1)
              for d in DOMAINS][:n_images]
    warmup = [(f"warm-{d}.png", png(synth.render(d, 778, 0)[0])) for d in DOMAINS]
    table = []
    try:
        if args.metrics_overhead:
            overhead = metrics_overhead(registry, args, images, warmup, clients, max(max_batches))
        for max_batch in [] if args.metrics_overhead else max_batches:
            with serve_node(registry, args.workdir, max_batch, args.max_wait_ms) as (url, _):
                drive(url, warmup * 4, len(warmup), 1)  # downloads + verifies the adapters, warms torch
                row = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, **drive(url, images, clients,
                                                                                       args.per_request)}
                row["service_batch_sizes_incl_warmup"] = httpx.get(url + "/healthz").json()["batch_sizes"]
            lat = row["latency_ms"]
            print(f"max_batch {max_batch:>3}: {row['images_per_s']:7.1f} img/s  p50 {lat['p50']:7.1f} ms  "
                  f"p99 {lat['p99']:7.1f} ms  mean batch {row['mean_batch_size']}", flush=True)
            table.append(row)
    finally:
        reg_server.should_exit = True
        reg_thread.join(timeout=20)

    machine = {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    command = " ".join(["python benchmarks/node_load.py", *(argv if argv is not None else sys.argv[1:])])
    if args.metrics_overhead:
        overhead.update(command=command, machine=machine, seconds=round(time.perf_counter() - t0, 1))
        out = record_overhead(args.out, "node", overhead)
        print(f"wrote {out} (key node)")
        return 0
    result = {
        "command": command,
        "what": "POST /v1/segment on loopback, one image (96x96 PNG) per request unless --per-request, 8 classes, "
                "3 adapters (top-k 5 capped at 3, T 0.05); service = semla-node serve in a subprocess, "
                "clients = threads in the benchmark process on the same machine",
        "config": {"clients": clients, "images": n_images, "per_request": args.per_request,
                   "max_wait_ms": args.max_wait_ms, "adapters": list(DOMAINS), "train_steps": args.steps,
                   "quick": args.quick},
        "machine": machine,
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
