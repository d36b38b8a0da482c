"""Brute force vs the IVF index (server/ann.py) at 100k and 1M 512-d centroids.

Library: adapters with two centroids each, drawn around random cluster centres (embeddings of
real domains are clustered; uniformly random 512-d vectors are the ANN worst case, where no
neighbour is much nearer than any other). Queries: half noisy copies of stored centroids, half
uniformly random unit vectors. Recall@5 = |ANN top-5 ∩ brute-force top-5| / 5, averaged.

    .venv/bin/python benchmarks/retrieval_ann.py            # writes benchmarks/results/retrieval_ann.json
    .venv/bin/python benchmarks/retrieval_ann.py --sizes 100000 --queries 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.server import ann

DIM = 512
CENTROIDS_PER_ADAPTER = 2
ADAPTERS_PER_CLUSTER = 50


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_table(n_centroids: int, rng: np.random.Generator) -> CentroidTable:
    n_adapters = n_centroids // CENTROIDS_PER_ADAPTER
    centres = unit(rng.standard_normal((max(1, n_adapters // ADAPTERS_PER_CLUSTER), DIM), dtype=np.float32))
    adapters = centres[rng.integers(0, len(centres), n_adapters)]
    adapters += (0.6 / np.sqrt(DIM)) * rng.standard_normal(adapters.shape, dtype=np.float32)
    adapters = unit(adapters)
    vectors = np.repeat(adapters, CENTROIDS_PER_ADAPTER, axis=0)
    for i in range(0, len(vectors), 100_000):  # in place, chunked: 1M x 512 noise is 2 GB
        v = vectors[i : i + 100_000]
        v += (0.3 / np.sqrt(DIM)) * rng.standard_normal(v.shape, dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n_adapters, dtype=np.int64), CENTROIDS_PER_ADAPTER)
    return CentroidTable(vectors, owner, n_adapters)


def make_queries(table: CentroidTable, n: int, rng: np.random.Generator) -> np.ndarray:
    near = table.vectors[rng.integers(0, len(table.vectors), n // 2)]
    near = unit(near + (0.3 / np.sqrt(DIM)) * rng.standard_normal(near.shape, dtype=np.float32))
    return np.concatenate([near, unit(rng.standard_normal((n - n // 2, DIM), dtype=np.float32))])


def ground_truth(table: CentroidTable, queries: np.ndarray, k: int) -> np.ndarray:
    """retrieve_numpy's top-k, in chunks (1000 x 1M distances would need 8 GB at once)."""
    return np.concatenate([retrieve_numpy(queries[i : i + 25], table, top_k=k)[0]
                           for i in range(0, len(queries), 25)])


def p50_ms(fn, queries: np.ndarray, batch: int, reps: int) -> float:
    times = []
    for r in range(reps):
        q = queries[(r * batch) % len(queries):][:batch]
        t = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t) * 1e3)
    return round(float(np.median(times)), 3)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run_size(n: int, n_queries: int, nprobes: list[int], rng: np.random.Generator) -> dict:
    t = time.perf_counter()
    table = make_table(n, rng)
    print(f"[{n}] data {time.perf_counter() - t:.1f}s", flush=True)
    queries = make_queries(table, n_queries, rng)
    t = time.perf_counter()
    truth = ground_truth(table, queries, 5)
    t_truth = time.perf_counter() - t
    print(f"[{n}] ground truth {t_truth:.1f}s", flush=True)

    t = time.perf_counter()
    index = ann.CentroidIndex.build(table)
    build_s = time.perf_counter() - t
    print(f"[{n}] build {build_s:.1f}s nlist={index.index.nlist}", flush=True)

    sweep = {}
    for p in sorted(set(nprobes + [index.nprobe])):
        ix = dataclasses.replace(index, nprobe=min(p, index.index.nlist))
        t = time.perf_counter()
        idx, dist, w = ix.search(queries, top_k=5)
        per_q = (time.perf_counter() - t) / len(queries) * 1e3
        half = len(queries) // 2
        # Exactness of what is returned: brute-force distance of the same adapters.
        exact = (2.0 - 2.0 * np.einsum("qd,qcd->qc", queries[:50], table.vectors[
            (idx[:50, :, None] * CENTROIDS_PER_ADAPTER + np.arange(CENTROIDS_PER_ADAPTER))].reshape(50, -1, DIM)))
        exact = np.sqrt(np.clip(exact, 0, None)).reshape(50, 5, CENTROIDS_PER_ADAPTER).min(-1)
        sweep[str(p)] = {
            "recall@5": round(recall(idx, truth), 4),
            "recall@5_noisy_copies": round(recall(idx[:half], truth[:half]), 4),
            "recall@5_random_queries": round(recall(idx[half:], truth[half:]), 4),
            "batch_ms_per_query": round(per_q, 3),
            "max_abs_dist_error_vs_exact": float(np.abs(exact - dist[:50]).max()),
            "weights_sum_max_dev": float(np.abs(w.sum(1) - 1).max()),
        }
        print(f"[{n}] nprobe={p} {sweep[str(p)]}", flush=True)

    reps_brute = 20 if n <= 100_000 else 8
    result = {
        "centroids": n,
        "adapters": table.n_adapters,
        "choose": ann.choose(table),
        "recall_queries": n_queries,
        "ground_truth_s": round(t_truth, 2),
        "brute": {
            "build_s": 0.0,
            "p50_ms_batch1": p50_ms(lambda q: retrieve_numpy(q, table, top_k=5), queries, 1, reps_brute),
            "p50_ms_batch16": p50_ms(lambda q: retrieve_numpy(q, table, top_k=5), queries, 16, reps_brute // 2),
        },
        "ann": {
            "nlist": int(index.index.nlist),
            "nprobe": index.nprobe,
            "build_s": round(build_s, 2),
            "p50_ms_batch1": p50_ms(lambda q: index.search(q, top_k=5), queries, 1, 100),
            "p50_ms_batch16": p50_ms(lambda q: index.search(q, top_k=5), queries, 16, 30),
            "recall@5": sweep[str(index.nprobe)]["recall@5"],
            "nprobe_sweep": sweep,
        },
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe-sweep", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retrieval_ann.json")
    args = ap.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    results = [run_size(n, args.queries, args.nprobe_sweep, rng) for n in args.sizes]
    out = {
        "command": " ".join([".venv/bin/python", "benchmarks/retrieval_ann.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
        },
        "constants": {
            "ANN_THRESHOLD": ann.ANN_THRESHOLD,
            "IVF_CENTROIDS_PER_LIST": ann.IVF_CENTROIDS_PER_LIST,
            "IVF_NPROBE": ann.IVF_NPROBE,
            "IVF_TRAIN_PER_LIST": ann.IVF_TRAIN_PER_LIST,
            "OVERFETCH": ann.OVERFETCH,
        },
        "data": __doc__.split("\n\n")[1].replace("\n", " "),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
