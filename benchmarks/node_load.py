"""Load on the node's HTTP service: throughput and latency per max_batch, benchmarks/results/node_load.json.

Everything on loopback: a registry (in this process) with three adapters (fog, night, rain;
trained for a few steps: only speed is measured here), then for each max_batch the real
``semla-node serve`` handler in a subprocess, driven by concurrent client threads that post
one image per request, with a vocabulary of 8 classes. Reported per max_batch: images/s,
request latency p50/p90/p99, the batch sizes the service actually formed and its mean queue
and compute time per image.

    python benchmarks/node_load.py            # 16 clients, 200 images, max_batch 1, 4, 16
    python benchmarks/node_load.py --quick    # 8 clients, 48 images, max_batch 1, 8 (-> /tmp)
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

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
    "from semla.registry._cli import run\n"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (8 clients, 48 images, max_batch 1 and 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/node_load.json; "
                        "with --quick /tmp/node_load_quick.json)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-node-load"))
    parser.add_argument("--clients", type=int, default=None, help="concurrent client threads (default 16; quick 8)")
    parser.add_argument("--images", type=int, default=None, help="images per max_batch setting (default 200; quick 48)")
    parser.add_argument("--per-request", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--max-batches", default=None, help="comma-separated max_batch values (default 1,4,16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the service's max_wait_ms (default 10)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per adapter (speed only; default 8)")
    args = parser.parse_args(argv)
    clients = args.clients or (8 if args.quick else 16)
    n_images = args.images or (48 if args.quick else 200)
    max_batches = [int(b) for b in (args.max_batches or ("1,8" if args.quick else "1,4,16")).split(",")]
    out = args.out or (Path("/tmp/node_load_quick.json") if args.quick else ROOT / "benchmarks/results/node_load.json")

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
        for max_batch in max_batches:
            port = free_port()
            serve_argv = ["serve", "--registry", registry, "--port", str(port), "--device", "cpu",
                          "--max-batch", str(max_batch), "--max-wait-ms", f"{args.max_wait_ms:g}",
                          "--refresh-seconds", "0", "--cache-dir", str(args.workdir / f"cache-{max_batch}")]
            log = args.workdir / f"node-{max_batch}.log"
            proc = start_node(serve_argv, log)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, proc, timeout=120, log=log)
                drive(url, warmup * 4, len(warmup), 1)  # downloads + verifies the adapters, warms torch
                row = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, **drive(url, images, clients,
                                                                                       args.per_request)}
                row["service_batch_sizes_incl_warmup"] = httpx.get(url + "/healthz").json()["batch_sizes"]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            lat = row["latency_ms"]
            print(f"max_batch {max_batch:>3}: {row['images_per_s']:7.1f} img/s  p50 {lat['p50']:7.1f} ms  "
                  f"p99 {lat['p99']:7.1f} ms  mean batch {row['mean_batch_size']}", flush=True)
            table.append(row)
    finally:
        reg_server.should_exit = True
        reg_thread.join(timeout=20)

    result = {
        "command": " ".join(["python benchmarks/node_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "what": "POST /v1/segment on loopback, one image (96x96 PNG) per request unless --per-request, 8 classes, "
                "3 adapters (top-k 5 capped at 3, T 0.05); service = semla-node serve in a subprocess, "
                "clients = threads in the benchmark process on the same machine",
        "config": {"clients": clients, "images": n_images, "per_request": args.per_request,
                   "max_wait_ms": args.max_wait_ms, "adapters": list(DOMAINS), "train_steps": args.steps,
                   "quick": args.quick},
        "machine": {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
