"""What a published centroid reveals, and what differential privacy on it costs:
benchmarks/results/privacy.json.

For each domain of a library (adapters trained and published through the real path, shared
with ``semla_benchmark.py``'s cache), its centroid is recomputed from ``n`` of the owner's
training images (n = 50, 200, 1000) exactly as ``semla-client train`` publishes it, without DP
(ε = ∞) and with Gaussian DP (ε = 8, 4, 1; δ 1e-5; :func:`semla.registry.privacy.dp_centroid`).
Every other adapter keeps its published centroid. Measured per (n, ε), averaged over domains
and noise draws:

* ``nearest_image_distance``: euclidean distance from the published centroid to the nearest
  single training embedding (unit vectors; 0 would mean the centroid *is* one image) and
  ``exact_mean_distance``: its distance from the exact, noise-free mean;
* ``top1_hit_rate``: how often the domain's own adapter is retrieved first for the domain's
  held-out images;
* ``fused_miou``: SemLA's mIoU on those held-out images (top-5, T 0.05, whole library).

The adapters themselves stay the ones trained on the benchmark's training set: only the
retrieval key changes. ``--federated`` also times a 3-owner, 3-round federated training on
loopback (a real SuperLink and three SuperNodes).

    python benchmarks/privacy.py                 # ~10 min on 2 CPU cores once adapters are cached
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import semla_benchmark as sb  # noqa: E402

from semla.registry import synth  # noqa: E402
from semla.registry.model import load_base  # noqa: E402
from semla.registry.node import Node  # noqa: E402
from semla.registry.privacy import dp_centroid  # noqa: E402
from semla.registry.train import embed_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOMAINS = ("clear", "night", "fog", "snow", "noise", "indoor_dim", "indoor_warm", "harbour_fog",
                   "harbour_rain", "fields_snow")


def training_embeddings(node: Node, domain: str, n: int) -> np.ndarray:
    """Frozen-base retrieval embeddings of the owner's first ``n`` training images, (n, D) float64."""
    seed = synth.split_seeds(domain)[0]
    images = [synth.render(domain, seed, i)[0] for i in range(n)]
    return embed_images(node.base, images).double().numpy()


def study(bench: sb.Bench, sizes: list[int], epsilons: list[float], draws: int, delta: float,
          progress: bool) -> dict:
    domains = list(bench.cfg.domains)
    lib = domains  # the whole library, the target's own adapter included
    rows: dict = {}
    embeddings = {d: training_embeddings(bench.node, d, max(sizes)) for d in
                  tqdm(domains, desc="embed training images", disable=not progress)}
    bar = tqdm(total=len(sizes) * len(epsilons) * len(domains), desc="privacy study", disable=not progress)
    for n in sizes:
        for eps in epsilons:
            stats = {"nearest_image_distance": [], "exact_mean_distance": [], "top1_hit_rate": [], "fused_miou": []}
            for i, target in enumerate(domains):
                x = embeddings[target][:n]
                exact = x.sum(0) / np.linalg.norm(x.sum(0))
                for r in range(draws if math.isfinite(eps) else 1):
                    rng = np.random.default_rng([n, i, r, int(eps * 1000) if math.isfinite(eps) else 0])
                    cent = dp_centroid(x, eps, delta, rng=rng).centroid
                    stats["nearest_image_distance"].append(float(np.linalg.norm(x - cent, axis=1).min()))
                    stats["exact_mean_distance"].append(float(np.linalg.norm(exact - cent)))
                    cents = {**bench.centroids, target: np.asarray(cent, dtype=np.float32)[None]}
                    idx, _ = bench.retrieve(target, lib, top_k=1, centroids=cents)
                    stats["top1_hit_rate"].append(float((idx[:, 0] == lib.index(target)).float().mean()))
                    stats["fused_miou"].append(bench.semla(target, lib, centroids=cents))
                bar.update()
            rows.setdefault(str(n), {})["inf" if not math.isfinite(eps) else str(eps)] = {
                k: round(float(np.mean(v)), 4) for k, v in stats.items()}
    bar.close()
    # for scale: how far apart two training images of one domain are, and two domains' centroids
    pair = [float(np.linalg.norm(embeddings[d][0] - embeddings[d][1])) for d in domains]
    cents = np.stack([bench.centroids[d][0] for d in domains])
    gaps = np.linalg.norm(cents[:, None] - cents[None], axis=-1)
    reference = {"mean_distance_between_two_training_images": round(float(np.mean(pair)), 4),
                 "mean_distance_to_nearest_other_domain_centroid":
                     round(float(np.mean(np.where(np.eye(len(domains), dtype=bool), np.inf, gaps).min(1))), 4)}
    return {"by_samples_and_epsilon": rows, "reference": reference}


def federated_wall_time(workdir: Path, local_steps: int, secure: bool) -> dict:
    """Seconds for 3 owners x 3 rounds on a real SuperLink and three SuperNodes on loopback."""
    from semla.client.federate import run_loopback
    from semla.client.federated import FederatedConfig
    from semla.client.flower_app import RunSettings

    train_seed = synth.split_seeds("fog")[0]
    owners = []
    for i in range(3):
        out = workdir / "federated" / f"owner{i}"
        shutil.rmtree(out, ignore_errors=True)
        owners.append(synth.write_dataset("fog", 60, train_seed + 1000 * (i + 1), out))
    bundle = (workdir / "federated" / ("bundle-secure" if secure else "bundle")).resolve()
    shutil.rmtree(bundle, ignore_errors=True)
    config = FederatedConfig(rounds=3, local_steps=local_steps, min_clients=3, secure_aggregation=secure)
    settings = RunSettings(name="fog-federated", out=str(bundle), classes=tuple(synth.get_scene("street").classes),
                           config=config)
    t0 = time.perf_counter()
    manifest = run_loopback(owners, settings, timeout=900)
    return {"owners": 3, "rounds": 3, "local_steps": local_steps, "secure_aggregation": secure,
            "seconds": round(time.perf_counter() - t0, 1), "participants": manifest.training.federated.participants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="library (and target) domains")
    parser.add_argument("--samples", default="50,200,1000", help="training images behind the centroid")
    parser.add_argument("--epsilons", default="inf,8,4,1", help="centroid DP budgets (inf: no DP)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--draws", type=int, default=5, help="noise draws per (domain, n, epsilon)")
    parser.add_argument("--steps", type=int, default=300, help="adapter training steps (shared cache)")
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--federated", action="store_true", help="also time 3-owner, 3-round federated runs (plain and SecAgg+)")
    parser.add_argument("--federated-steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    domains = tuple(args.domains.split(","))
    sizes = [int(s) for s in args.samples.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    progress = not args.quiet
    t0 = time.perf_counter()
    cfg = sb.Config(domains=domains, steps=args.steps, n_test=args.n_test)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = load_base()
    bundles, _ = sb.train_adapters(cfg, args.workdir, base.ref.fingerprint, progress)
    bench = sb.pull_library(cfg, args.workdir, bundles, base)
    results = {
        "config": {"domains": list(domains), "samples": sizes, "epsilons": [str(e) for e in epsilons],
                   "delta": args.delta, "draws": args.draws, "top_k": cfg.top_k, "temperature": cfg.temperature,
                   "n_test": cfg.n_test, "base_fingerprint": base.ref.fingerprint,
                   "mechanism": "analytic Gaussian on the clipped sum and the count (semla.registry.privacy)"},
        **study(bench, sizes, epsilons, args.draws, args.delta, progress),
    }
    if args.federated:
        results["federated_wall_time"] = [federated_wall_time(args.workdir, args.federated_steps, secure)
                                          for secure in (False, True)]
    results["command"] = ("python benchmarks/privacy.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results["machine"] = {"device": "cpu", "threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'n':>5s} {'eps':>5s} {'near-img':>9s} {'to-mean':>8s} {'top1':>6s} {'mIoU':>6s}")
    for n, by_eps in results["by_samples_and_epsilon"].items():
        for eps, r in by_eps.items():
            print(f"{n:>5s} {eps:>5s} {r['nearest_image_distance']:9.3f} {r['exact_mean_distance']:8.3f} "
                  f"{r['top1_hit_rate']:6.3f} {r['fused_miou']:6.3f}")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
