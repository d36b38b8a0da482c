"""The node's verified adapter cache: cold start, warm hit, disk hit, eviction.

Starts a registry on loopback, publishes six semla-tiny adapters (few training steps: only
their size matters here), then times ``Node.adapter()`` (download + full verification + load),
a memory hit, a disk hit after a node restart (re-verified), and a churn through all six with a
host budget of two adapters (eviction on every access). Results: benchmarks/results/node_cache.json.

    python benchmarks/node_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from semla.registry.cache import CacheLimits  # noqa: E402
from semla.registry.http import RegistryClient  # noqa: E402
from semla.registry.model import load_base  # noqa: E402
from semla.registry.node import Node  # noqa: E402
from semla.server.local import local_registry  # noqa: E402

DOMAINS = ["clear", "fog", "night", "rain", "snow", "sepia"]


def ms(fn, reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(times)), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "node_cache.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-node-cache"))
    args = parser.parse_args(argv)
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    base = load_base()
    token = os.urandom(8).hex()
    with local_registry(args.workdir / "registry", token) as url:
        client = RegistryClient(url)
        for i, domain in enumerate(DOMAINS):
            demo.publish_owner(client, token, domain, args.workdir / "owners" / domain, base, seed=i, n_train=50,
                               steps=5, progress=False)
        node = Node(client, base=base, cache_dir=args.workdir / "cache")
        node.pull()
        lib = node.library
        adapter_bytes = sum(t.numel() * 4 for d in (node.adapter(lib[0]).A, node.adapter(lib[0]).B) for t in d.values())
        cold = [ms(lambda s=s: node.adapter(s)) for s in lib[1:]]  # lib[0] was loaded above
        warm = [ms(lambda s=s: node.adapter(s), reps=20) for s in lib]

        restarted = Node(client, base=base, cache_dir=args.workdir / "cache")
        restarted.pull()
        disk = [ms(lambda s=s: restarted.adapter(s)) for s in lib]
        assert restarted.cache.stats["downloads"] == 0

        budget = int(adapter_bytes * 2.5)
        churn = Node(client, base=base, cache_dir=args.workdir / "cache", limits=CacheLimits(host_bytes=budget))
        churn.pull()
        peak, churn_ms = 0, []
        for _ in range(3):
            for s in lib:
                churn_ms.append(ms(lambda s=s: churn.adapter(s)))
                peak = max(peak, churn.cache.usage()["host_bytes"])
    result = {
        "command": ("python benchmarks/node_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "device": "cpu",
        "adapter_bytes": adapter_bytes,
        "adapters": len(lib),
        "cold_download_verify_load_ms": {"median": float(np.median(cold)), "max": max(cold)},
        "warm_memory_hit_ms": {"median": float(np.median(warm)), "max": max(warm)},
        "disk_hit_reverify_load_ms": {"median": float(np.median(disk)), "max": max(disk)},
        "eviction_churn": {"host_budget_bytes": budget, "peak_host_bytes": peak, "accesses": len(churn_ms),
                           "evictions": churn.cache.stats["host_evictions"], "median_ms": float(np.median(churn_ms)),
                           "within_budget": peak <= budget},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
