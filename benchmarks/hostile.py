"""Hostile inputs against memory and 5xx: benchmarks/results/hostile.json.

Three parts, each against a stated bound (the script exits 1 when one is broken):

* **Registry memory per request.** A real ``semla-server`` (uvicorn, a child process) gets
  hostile uploads of 1, 8, 32 and 128 MiB in several shapes and JSON bodies; the child's RSS is
  sampled every few ms and the peak above its level before the request is recorded. Bound: at
  most ``3 x request size + 64 MiB`` per upload (the multipart body is held in memory once, plus
  one copy per part while it is assembled, plus a boolean mask of the weights for the finite
  check), and at most 64 MiB for any JSON body (refused above 1 MiB before it is read).
* **Node memory against pixels x classes.** A fresh process loads the bundled base and, for
  each configuration (smallest first, freed memory handed back to the OS with ``malloc_trim``
  in between), segments one image of ``side x side`` pixels for ``C`` class names on the base
  path (retrieval and fusion add tensors that do not grow with pixels or classes). The peak RSS
  above the level before each configuration is recorded against ``bytes_per_pixel_class x side^2 x C +
  512 MiB``, with the per-element constant given by ``--node-bytes-per-pixel-class`` (default
  10: float32 logits at image size plus the argmax's temporaries, i.e. the code as it is,
  not chunked).
* **No 5xx.** Every row of ``tests/test_hostile_requests.py``'s matrix is sent to the real
  server; then ``benchmarks/fuzz_api.py`` fuzzes every operation of the served OpenAPI
  (including routes added after ``fuzz.json`` was recorded) with ``--fuzz-examples`` examples.

    python benchmarks/hostile.py                       # the recorded run
    python benchmarks/hostile.py --quick --out /tmp/hostile.json
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
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIB = 1024 * 1024
ADMIN = "hostile-bench-token"


class PeakRss:
    """Sample a process's RSS in a thread; ``peak - start`` is what a block of work added."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added_mib(self) -> float:
        return round((self.peak - self.start) / MIB, 1)


# -- hostile uploads ------------------------------------------------------------------------------
def _safetensors(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


def upload_shapes(tmp: Path, key) -> dict:
    """Request shape → builder(size in bytes) → bundle files (name → bytes)."""
    import bundle_factory
    from semla.schemas import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE

    base = bundle_factory.make_bundle_files(tmp, key, name="memory-probe")

    def manifest_objects(size: int) -> dict:
        return {**base, MANIFEST_FILE: b"[" + b"{}," * ((size - 4) // 3) + b"{}]"}

    def manifest_nested(size: int) -> dict:
        return {**base, MANIFEST_FILE: b"[" * size}

    def weights_one_tensor(size: int) -> dict:  # signed, valid safetensors, refused after the finite check
        n = size // 4
        header = json.dumps({"x": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
        weights = _safetensors(header, bytes(4 * n))
        return bundle_factory.replace_file(base, ADAPTER_WEIGHTS_FILE, weights, key=key)

    def weights_header_objects(size: int) -> dict:  # the header claims the whole file
        header = b"{" + b'"a":{},' * ((size - 16) // 7) + b'"b":{}}'
        return bundle_factory.replace_file(base, ADAPTER_WEIGHTS_FILE, _safetensors(header), key=key)

    return {
        "manifest [{},{},...] (unsigned)": manifest_objects,
        "manifest [[[[... (unsigned)": manifest_nested,
        "weights: one F32 tensor, signed": weights_one_tensor,
        "weights: header of {} objects, signed": weights_header_objects,
    }


def _upload(url: str, files: dict) -> httpx.Response:
    parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
    return httpx.post(f"{url}/v1/adapters", files=parts, timeout=300)


def _code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def registry_memory(url: str, pid: int, tmp: Path, key, sizes_mib: list[int]) -> list[dict]:
    rows = []
    for shape, build in upload_shapes(tmp, key).items():
        for size_mib in sizes_mib:
            files = build(size_mib * MIB)
            request_bytes = sum(len(d) for d in files.values())
            started = time.perf_counter()
            with PeakRss(pid) as rss:
                response = _upload(url, files)
            del files
            bound = round(3 * request_bytes / MIB + 64, 1)
            rows.append({"request": "POST /v1/adapters", "shape": shape, "size_mib": size_mib,
                         "status": response.status_code, "code": _code(response),
                         "peak_added_mib": rss.added_mib, "bound_mib": bound, "within_bound": rss.added_mib <= bound,
                         "seconds": round(time.perf_counter() - started, 2)})
            print(f"{shape:42s} {size_mib:4d} MiB -> {response.status_code} {_code(response)} "
                  f"+{rss.added_mib} MiB (bound {bound})", flush=True)
    for size_mib in sorted({1, *sizes_mib}):
        body = b'{"embedding":[' + b"0.5," * ((size_mib * MIB - 20) // 4) + b'0.5]}'
        started = time.perf_counter()
        with PeakRss(pid) as rss:
            response = httpx.post(f"{url}/v1/retrieve", content=body, timeout=300,
                                  headers={"content-type": "application/json"})
        rows.append({"request": "POST /v1/retrieve", "shape": "JSON array of floats", "size_mib": size_mib,
                     "status": response.status_code, "code": _code(response), "peak_added_mib": rss.added_mib,
                     "bound_mib": 64.0, "within_bound": rss.added_mib <= 64.0,
                     "seconds": round(time.perf_counter() - started, 2)})
        print(f"{'retrieve JSON body':42s} {size_mib:4d} MiB -> {response.status_code} {_code(response)} "
              f"+{rss.added_mib} MiB", flush=True)
    return rows


def hostile_matrix(url: str, tmp: Path, key) -> dict:
    """Every row of tests/test_hostile_requests.py against the real server: status codes seen."""
    import test_hostile_requests as matrix

    rows = {}
    for row_id, build, status, code in matrix.UPLOADS:
        response = _upload(url, build(tmp, key))
        rows[f"upload {row_id}"] = {"status": response.status_code, "code": _code(response),
                                    "expected": [status, code]}
    for row_id, method, path, content, headers, status, code in matrix.BODIES:
        headers = {"content-type": "application/json", **headers}
        if not headers["content-type"]:
            del headers["content-type"]
        if "content-length" in headers:  # httpx sets the true length; send the lie by hand
            continue
        response = httpx.request(method, url + path, content=content, headers=headers, timeout=60)
        rows[f"body {row_id}"] = {"status": response.status_code, "code": _code(response),
                                  "expected": [status, code]}
    return {"rows": rows, "5xx": sum(r["status"] >= 500 for r in rows.values()),
            "as_expected": sum([r["status"], r["code"]] == r["expected"] for r in rows.values())}


# -- node memory ----------------------------------------------------------------------------------
def node_probe(configs: list[tuple[int, int]]) -> list[dict]:
    """In this (fresh) process: peak RSS one image of side² pixels x ``classes`` names adds."""
    import ctypes

    import numpy as np
    import torch

    from semla.registry.node import Node

    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        node = Node("http://127.0.0.1:9", device="cpu", cache_dir=Path(cache))
        for side, classes in sorted(configs, key=lambda c: c[0] * c[0] * c[1]):
            texts = [node.text([f"class {i}" for i in range(classes)])]
            image = np.zeros((side, side, 3), dtype=np.uint8)
            pixels, _ = node.embed([image[:64, :64]])  # warm the model's buffers at the smallest size
            node.masks(node.logits(node.fused_dense(pixels, None), texts), [(64, 64)])
            libc.malloc_trim(0)
            started = time.perf_counter()
            with PeakRss(os.getpid()) as rss:
                pixels, _ = node.embed([image])
                masks = node.masks(node.logits(node.fused_dense(pixels, None), texts), [(side, side)])
            assert masks[0].shape == (side, side)
            del masks, pixels
            rows.append({"side": side, "classes": classes, "pixels_x_classes": side * side * classes,
                         "peak_added_mib": rss.added_mib, "seconds": round(time.perf_counter() - started, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def node_memory(configs: list[tuple[int, int]], bytes_per_element: float) -> list[dict]:
    spec = ",".join(f"{side}x{classes}" for side, classes in configs)
    out = subprocess.run([sys.executable, __file__, "--node-probe", spec], capture_output=True, text=True,
                         timeout=1800, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return [{"configs": spec, "error": out.stderr.strip().splitlines()[-3:]}]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for row in rows:
        row["bound_mib"] = round(bytes_per_element * row["pixels_x_classes"] / MIB + 512, 1)
        row["within_bound"] = row["peak_added_mib"] <= row["bound_mib"]
        print(f"node {row['side']}x{row['side']} x {row['classes']} classes: +{row['peak_added_mib']} MiB "
              f"(bound {row['bound_mib']})", flush=True)
    return rows


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 8 MiB, small node images, 20 fuzz examples")
    parser.add_argument("--fuzz-examples", type=int, default=None, help="per operation and mode (default 100)")
    parser.add_argument("--node-bytes-per-pixel-class", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile.json")
    parser.add_argument("--node-probe", metavar="SIDExCLASSES,...", help=argparse.SUPPRESS)
    parser.add_argument("--skip-node", action="store_true", help="leave out the node's memory")
    args = parser.parse_args(argv)
    if args.node_probe:
        configs = [tuple(int(n) for n in item.split("x")) for item in args.node_probe.split(",")]
        print(json.dumps(node_probe(configs)))
        return 0

    from semla.registry import keys
    from semla.server.local import local_registry

    sizes = [1, 8] if args.quick else [1, 8, 32, 128]
    node_configs = [(256, 8), (256, 255), (512, 64)] if args.quick else \
        [(256, 8), (256, 255), (512, 64), (1024, 8), (1024, 64), (1024, 255), (2048, 16)]
    fuzz_examples = args.fuzz_examples or (20 if args.quick else 100)
    t0 = time.perf_counter()
    results: dict = {"command": "python benchmarks/hostile.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with local_registry(tmp / "data", ADMIN, log=tmp / "server.log", timeout=120) as url:
            pid = next(p.pid for p in psutil.Process().children() if "semla-server" in " ".join(p.cmdline()))
            key = keys.generate_key()
            httpx.post(f"{url}/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).raise_for_status()
            results["matrix"] = hostile_matrix(url, tmp, key)
            print(f"matrix: {len(results['matrix']['rows'])} rows, {results['matrix']['5xx']} x 5xx", flush=True)
            results["registry_memory"] = registry_memory(url, pid, tmp, key, sizes)
            results["server_rss_after_mib"] = round(psutil.Process(pid).memory_info().rss / MIB, 1)
    results["node_memory"] = [] if args.skip_node else node_memory(node_configs, args.node_bytes_per_pixel_class)

    import fuzz_api

    with tempfile.TemporaryDirectory() as tmp_name:
        fuzz_out = Path(tmp_name) / "fuzz.json"
        fuzz_api.main(["--max-examples", str(fuzz_examples), "--out", str(fuzz_out)])
        fuzz = json.loads(fuzz_out.read_text())
    recorded = set(json.loads((ROOT / "benchmarks" / "results" / "fuzz.json").read_text())["operations"])
    results["fuzz"] = {
        "max_examples_per_operation_and_mode": fuzz_examples,
        "summary": fuzz["summary"],
        "operations_added_since_fuzz_json": sorted(set(fuzz["operations"]) - recorded),
        "per_operation": {op: {mode: {"requests": m["requests"], "status_codes": m["status_codes"],
                                      "failures": m["failures"]} for mode, m in modes.items()}
                          for op, modes in fuzz["operations"].items()},
        "5xx": sum(n for modes in fuzz["operations"].values() for m in modes.values()
                   for code, n in m["status_codes"].items() if code.startswith("5")),
    }
    broken = [r for r in results["registry_memory"] + results["node_memory"] if not r.get("within_bound", False)]
    results["summary"] = {
        "matrix_5xx": results["matrix"]["5xx"],
        "fuzz_5xx": results["fuzz"]["5xx"],
        "fuzz_failures": fuzz["summary"]["failures"],
        "registry_memory_within_bound": all(r["within_bound"] for r in results["registry_memory"]),
        "node_memory_within_bound": all(r.get("within_bound", False) for r in results["node_memory"]),
        "node_memory_measured": bool(results["node_memory"]),
        "bounds": {
            "upload": "peak RSS added <= 3 x request size + 64 MiB",
            "json_body": "peak RSS added <= 64 MiB (bodies over 1 MiB refused before they are read)",
            "node": f"peak RSS added <= {args.node_bytes_per_pixel_class:g} B x pixels x classes + 512 MiB",
        },
    }
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    ok = not broken and results["matrix"]["5xx"] == 0 and results["fuzz"]["5xx"] == 0 and not fuzz["summary"]["failures"]
    print(f"{'ok' if ok else 'BOUND BROKEN'} -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
