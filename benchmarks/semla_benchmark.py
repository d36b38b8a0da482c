"""The SemLA benchmark: 20 synthetic domains, leave-one-out, every method, ablations, plots.

Does retrieving and fusing adapters from a library adapt the segmenter to an unseen domain
without training, better than the base model and better than merging everything?

1. **Adapters, through the real path.** For every domain: render its private training set
   (its own seeds, :func:`semla.registry.synth.split_seeds`), train with ``semla-client train``,
   then one data owner per domain makes a key, registers it, signs and publishes to a registry
   on 127.0.0.1; a node pulls the signed index and downloads and verifies every adapter.
   Trained bundles are cached in the work dir, so a second run (or one that was interrupted)
   only trains what is missing.
2. **Leave-one-out.** For each target domain its own adapter is removed from the library and
   every method segments the target's held-out test set with the target's class list:
   ``base`` (no adapter), ``oracle`` (the target's own adapter: the upper bound), ``uniform``
   (all library adapters at equal weight, exact fusion), ``nearest`` (the single nearest
   adapter) and ``semla`` (top-k, exact per-image fusion; DESIGN §4 defaults: euclidean, k 5,
   the ``calibrated`` weighting of :mod:`semla.registry.weighting` at its own temperature). Reported: mIoU per domain and method, averages, the share of the
   base→oracle gap that SemLA closes, and on how many domains SemLA beats uniform and nearest.
3. **Ablations**, averaged over the same leave-one-out targets: top-k, temperature, distance,
   centroids per adapter (1 vs k-means 4, computed by the same function ``train --centroids 4``
   uses, from the same training images), fusion (exact vs averaging A and B vs truncated SVD),
   Gaussian DP on the centroids, and library size (random sub-libraries of 2..19 adapters).

Nothing is tuned on the test sets: every setting is DESIGN §4's default, and the ablations
only report.

    python benchmarks/semla_benchmark.py            # full: 20 domains (~35 min on 2 CPU cores)
    python benchmarks/semla_benchmark.py --quick    # 3 domains, few steps, a few minutes

Results: ``benchmarks/results/semla.json`` and PNG plots beside it (``--out-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from semla.client import cli as client_cli  # noqa: E402
from semla.client.publish import publish_bundle  # noqa: E402
from semla.registry import keys, synth  # noqa: E402
from semla.registry.basecard import compute_base_card  # noqa: E402
from semla.registry.data import miou  # noqa: E402
from semla.registry.fusion import LoraAdapter  # noqa: E402
from semla.registry.http import RegistryClient  # noqa: E402
from semla.registry.model import DenseClip, load_base  # noqa: E402
from semla.registry.node import Node, Retrieval  # noqa: E402
from semla.registry.privacy import dp_centroid  # noqa: E402
from semla.registry.retrieval import CentroidTable, retrieve_torch  # noqa: E402
from semla.schemas.errors import UnknownNameError  # noqa: E402
from semla.registry.train import compute_centroids, embed_images  # noqa: E402
from semla.server.local import local_registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "oracle", "uniform", "nearest", "semla")
FUSIONS = ("exact", "average_ab", "svd")
QUICK_DOMAINS = 3


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a benchmark's domains come from: a synthetic generator or real dataset folders.

    ``train_dir(domain, n, out)`` returns a folder ``semla-client train`` reads (writing it to
    ``out`` if it must); ``train_set`` / ``test_set(domain, n)`` return ``(images, masks)``;
    ``key(domain)`` is what a cached adapter depends on besides the settings.
    """

    name: str
    classes: Callable[[str], list[str]]
    description: Callable[[str], str]
    key: Callable[[str], dict]
    train_dir: Callable[[str, int, Path], Path]
    train_set: Callable[[str, int], tuple[list, list]]
    test_set: Callable[[str, int], tuple[list, list]]
    seeds: Callable[[str], dict | None] = lambda domain: None


def generated(name: str, module, classes: Callable[[str], list[str]], description: Callable[[str], str]) -> DataSource:
    """A :class:`DataSource` over a generator module with ``split_seeds``, ``render`` and ``write_dataset``."""

    def split(domain: str, n: int, which: int) -> tuple[list, list]:
        seed = module.split_seeds(domain)[which]
        images, masks = zip(*(module.render(domain, seed, i) for i in range(n)))
        return list(images), list(masks)

    def train_dir(domain: str, n: int, out: Path) -> Path:
        if out.exists():
            shutil.rmtree(out)
        return module.write_dataset(domain, n, module.split_seeds(domain)[0], out)

    return DataSource(
        name, classes, description, key=lambda d: {"train_seed": module.split_seeds(d)[0]}, train_dir=train_dir,
        train_set=lambda d, n: split(d, n, 0), test_set=lambda d, n: split(d, n, 1),
        seeds=lambda d: dict(zip(("train", "test"), module.split_seeds(d))))


SYNTH = generated("unique-shift", synth, lambda d: list(synth.get_scene(synth.get_domain(d).scene).classes),
                  lambda d: synth.get_domain(d).description)


@dataclasses.dataclass(frozen=True)
class Config:
    domains: tuple[str, ...]
    steps: int = 300
    n_train: int = 100
    n_test: int = 40
    top_k: int = 5
    temperature: float | None = None  # None: the weighting scheme's own default
    weighting: str = "calibrated"  # DESIGN §4's default scheme (semla.registry.weighting)
    distance: str = "euclidean"
    seed: int = 0
    top_ks: tuple[int, ...] = (1, 3, 5, 10, 0)  # 0: the whole library
    temperatures: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    dp_epsilons: tuple[float, ...] = (8.0, 4.0, 1.0)
    dp_delta: float = 1e-5
    library_sizes: tuple[int, ...] = (2, 4, 8, 12, 16, 19)
    library_draws: int = 3
    kmeans: int = 4

    def training_key(self, domain: str, base_fingerprint: str, data: DataSource = SYNTH, **extra) -> str:
        """What a cached bundle depends on: change any of it and the adapter is retrained."""
        blob = json.dumps({"domain": domain, "steps": self.steps, "n_train": self.n_train, "seed": self.seed,
                           **data.key(domain), "base": base_fingerprint, **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- 1. adapters through the real path -----------------------------------------------------------


def train_adapters(cfg: Config, workdir: Path, base_fingerprint: str, progress: bool, data: DataSource = SYNTH,
                   extra_args: Sequence[str] = ()) -> tuple[dict[str, Path], list[str]]:
    """Train (or reuse) one bundle per domain with ``semla-client train``: (bundles, domains trained now).

    ``extra_args`` go to ``semla-client train`` (e.g. ``--base``, ``--pretrained``) and into the cache key.
    """
    bundles: dict[str, Path] = {}
    todo = []
    for domain in cfg.domains:
        key = cfg.training_key(domain, base_fingerprint, data, **({"args": list(extra_args)} if extra_args else {}))
        out = workdir / "bundles" / f"{domain}-{key}"
        bundles[domain] = out
        if not (out / "manifest.json").is_file():
            todo.append(domain)
    bar = tqdm(todo, desc="train adapters", unit="adapter", disable=not progress or not todo)
    for domain in bar:
        bar.set_postfix(domain=domain)
        folder = data.train_dir(domain, cfg.n_train, workdir / "data" / domain)
        tmp = bundles[domain].with_name(bundles[domain].name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        argv = ["train", "--data", str(folder), "--out", str(tmp), "--name", domain, "--steps", str(cfg.steps),
                "--seed", str(cfg.seed), "--domain", data.description(domain), *extra_args]
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), \
                (contextlib.nullcontext() if progress else contextlib.redirect_stderr(err)):
            rc = client_cli.main(argv)
        if rc != 0:
            raise SystemExit(f"semla-client train failed for {domain} (exit {rc}){err.getvalue()[-2000:]}")
        tmp.replace(bundles[domain])
    return bundles, todo


def publish_all(bundles: dict[str, Path], client: RegistryClient, token: str, workdir: Path) -> None:
    """One data owner per domain: a key (kept in the work dir), registered, signs and publishes."""
    for domain, bundle in bundles.items():
        (workdir / "keys").mkdir(exist_ok=True)
        key = keys.load_or_create_key(workdir / "keys" / f"{domain}.key")
        client.register_key(keys.public_bytes(key).hex(), token, label=f"{domain} owner")
        publish_bundle(bundle, client, key=key)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the child processes started inside, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pull_library(cfg: Config, workdir: Path, bundles: dict[str, Path], base: DenseClip, data: DataSource = SYNTH,
                 bench_cls: type | None = None) -> "Bench":
    """Publish every bundle to a fresh registry on loopback; a node pulls the signed index and
    downloads and verifies every adapter (the registry stops afterwards; the node keeps them).

    The registry is given the base's card (``semla-server bases add`` does the same), so a base
    other than the bundled one (a retrained semla-tiny, a real CLIP) is accepted."""
    for sub in ("registry", "node-cache"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    card = compute_base_card(base)
    (workdir / "registry" / "bases").mkdir(parents=True)
    (workdir / "registry" / "bases" / f"{card.fingerprint[:16]}.json").write_bytes(card.to_json() + b"\n")
    token = os.urandom(16).hex()
    floor = getattr(cfg, "min_samples", None)  # a smaller sample floor (smoke tests) for this registry only
    env = {"SEMLA_MIN_SAMPLES": str(floor)} if floor is not None else {}
    with _environ(env), local_registry(workdir / "registry", token, log=workdir / "server.log") as url:
        client = RegistryClient(url)
        publish_all(bundles, client, token, workdir)
        node = Node(client, base=base, cache_dir=workdir / "node-cache", card=card)
        node.pull()
        return (bench_cls or Bench)(node, cfg, workdir, data)


# -- 2. evaluation ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One domain's held-out test set, ready for the model."""

    classes: list[str]
    pixels: torch.Tensor  # (B, 3, S, S)
    query: torch.Tensor  # (B, D) frozen-base retrieval embeddings
    text: torch.Tensor  # (C, E)
    masks: list[np.ndarray]


class Bench:
    """The pulled library plus the test sets; every method is a weight matrix over the library."""

    def __init__(self, node: Node, cfg: Config, workdir: Path, data: DataSource = SYNTH) -> None:
        self.node, self.cfg, self.workdir, self.data = node, cfg, workdir, data
        self.names = [s.name for s in node.library]
        self.index = {n: i for i, n in enumerate(self.names)}
        missing = [d for d in cfg.domains if d not in self.index]
        if missing:
            raise SystemExit(f"not in the pulled library: {missing}")
        self.adapters = {d: node.adapter(node.library[self.index[d]]) for d in cfg.domains}
        self.centroids = {d: np.asarray(node.library[self.index[d]].centroids, dtype=np.float32)
                          for d in cfg.domains}
        self.spreads = {d: node.library[self.index[d]].spread for d in cfg.domains}  # None: schema 1
        self.targets = {d: self.prepare(d, *data.test_set(d, cfg.n_test)) for d in cfg.domains}
        self._train_embeddings: dict[str, torch.Tensor] = {}

    def prepare(self, domain: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Target:
        """Images of a domain, embedded once: pixels, retrieval queries, the class names' text embeddings."""
        classes = self.data.classes(domain)
        pixels, query = self.node.embed(list(images))
        return Target(classes, pixels, query, self.node.text(classes), list(masks))

    def train_embeddings(self, domain: str) -> torch.Tensor:
        """Frozen-base retrieval embeddings (N, D) of the domain's training images, computed once."""
        if domain not in self._train_embeddings:
            images, _ = self.data.train_set(domain, self.cfg.n_train)
            self._train_embeddings[domain] = embed_images(self.node.base, images)
        return self._train_embeddings[domain]

    def library(self, target: str, pool: Sequence[str] | None = None) -> list[str]:
        """Leave-one-out: every benchmarked domain but the target (or a given sub-library)."""
        return [d for d in (pool if pool is not None else self.cfg.domains) if d != target]

    # one forward per (target, weights) ------------------------------------------------------
    @torch.no_grad()
    def miou(self, target: str | Target, lib: Sequence[str] | None, idx: torch.Tensor | None = None,
             weights: torch.Tensor | None = None, fusion: str = "exact") -> float:
        """mIoU on the target's test set (or on a given :class:`Target`); ``idx``/``weights`` (B, k) index into ``lib``."""
        t = target if isinstance(target, Target) else self.targets[target]
        if lib is None:  # the base model
            dense = self.node.fused_dense(t.pixels, None)
        elif fusion == "exact":
            lib_idx = torch.tensor([self.index[d] for d in lib])[idx]
            dense = self.node.fused_dense(t.pixels, Retrieval(lib_idx, torch.zeros_like(weights), weights))
        else:
            dense = self._approximate(t.pixels, [[self.adapters[lib[j]] for j in row] for row in idx.tolist()],
                                      weights, fusion)
        preds = self.node.masks(self.node.logits(dense, [t.text] * len(t.masks)), [m.shape for m in t.masks])
        return round(miou(preds, t.masks, len(t.classes)), 4)

    def _approximate(self, pixels: torch.Tensor, chosen: list[list[LoraAdapter]], weights: torch.Tensor,
                     fusion: str) -> torch.Tensor:
        """The inexact fusions the design rejects, for the ablation: one synthetic adapter per image."""
        per_image = [_combine(adapters, w.tolist(), fusion) for adapters, w in zip(chosen, weights)]
        engine = self.node.engine
        engine.unmerge()
        engine.set_mixture(per_image, torch.eye(len(per_image)), layout="gather")
        try:
            return self.node.base.encode_dense(pixels)
        finally:
            engine.clear()

    def retrieve(self, target: str, lib: Sequence[str], *, top_k: int | None = None, temperature: float | None = None,
                 distance: str | None = None, centroids: dict[str, np.ndarray] | None = None):
        cfg = self.cfg
        cents = centroids or self.centroids
        table = CentroidTable.from_lists([cents[d] for d in lib], [self.spreads[d] for d in lib])
        k = top_k or len(lib)
        idx, _, weights = retrieve_torch(self.targets[target].query, table, top_k=min(k, len(lib)),
                                         temperature=temperature or cfg.temperature, weighting=cfg.weighting,
                                         distance=distance or cfg.distance)
        return idx, weights

    def semla(self, target: str, lib: Sequence[str] | None = None, fusion: str = "exact", **kw) -> float:
        lib = lib if lib is not None else self.library(target)
        kw.setdefault("top_k", self.cfg.top_k)
        idx, weights = self.retrieve(target, lib, **kw)
        return self.miou(target, lib, idx, weights, fusion)

    def methods(self, target: str) -> dict[str, float]:
        lib = self.library(target)
        n, b = len(lib), len(self.targets[target].masks)
        everything = torch.arange(n).expand(b, n)
        return {
            "base": self.miou(target, None),
            "oracle": self.miou(target, [target], torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1)),
            "uniform": self.miou(target, lib, everything, torch.full((b, n), 1.0 / n)),
            "nearest": self.semla(target, lib, top_k=1),
            "semla": self.semla(target, lib),
        }


def _combine(adapters: Sequence[LoraAdapter], weights: Sequence[float], fusion: str) -> LoraAdapter:
    """Average A and B separately (LoRAX / peft ``linear`` style), or truncate the exact sum by SVD."""
    modules = sorted(set().union(*(a.A for a in adapters)))
    A, B = {}, {}
    for m in modules:
        held = [(a, w) for a, w in zip(adapters, weights) if m in a.A]
        if fusion == "average_ab":  # s is shared: every benchmark adapter has the same rank and alpha
            A[m] = sum(w * a.A[m] for a, w in held)
            B[m] = sum(w * a.B[m] for a, w in held)
        elif fusion == "svd":  # best rank-r approximation of sum w s B A, r = the adapters' rank
            delta = sum(w * a.delta(m) for a, w in held)
            r = held[0][0].A[m].shape[0]
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            B[m], A[m] = u[:, :r] * s[:r], vh[:r]
        else:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    scale = adapters[0].scale if fusion == "average_ab" else 1.0
    return LoraAdapter(key=f"{fusion}:" + "+".join(a.key for a in adapters), scale=scale, A=A, B=B)


def kmeans_centroids(bench: Bench) -> dict[str, np.ndarray]:
    """k-means centroids from each domain's training images (what ``train --centroids k`` publishes)."""
    cfg = bench.cfg
    return {d: compute_centroids(bench.train_embeddings(d), k=cfg.kmeans, seed=cfg.seed) for d in cfg.domains}


def dp_centroids(bench: Bench, epsilon: float) -> dict[str, np.ndarray]:
    """Each domain's centroid as ``train --dp-epsilon`` publishes it (seeded noise)."""
    cfg, out = bench.cfg, {}
    for i, d in enumerate(cfg.domains):
        emb = bench.train_embeddings(d).double().numpy()
        rng = np.random.default_rng([cfg.seed, i, int(epsilon * 1000)])
        out[d] = np.asarray(dp_centroid(emb, epsilon, cfg.dp_delta, rng=rng).centroid, dtype=np.float32)[None]
    return out


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


def run_ablations(bench: Bench, cfg: Config, progress: bool) -> dict:
    targets = list(cfg.domains)
    each = lambda fn: _mean(fn(t) for t in targets)  # noqa: E731
    steps = (len(cfg.top_ks) + len(cfg.temperatures) + 2 + 2 + len(FUSIONS) + len(cfg.dp_epsilons)
             + len(cfg.library_sizes))
    bar = tqdm(total=steps, desc="ablations", disable=not progress)

    def tick(result):
        bar.update()
        return result

    ab: dict = {}
    ab["top_k"] = {str(k or "all"): tick(each(lambda t: bench.semla(t, top_k=k or None))) for k in cfg.top_ks}
    ab["temperature"] = {str(T): tick(each(lambda t: bench.semla(t, temperature=T))) for T in cfg.temperatures}
    ab["distance"] = {d: tick(each(lambda t: bench.semla(t, distance=d))) for d in ("euclidean", "cosine")}
    km = kmeans_centroids(bench)
    ab["centroids"] = {"1": tick(each(lambda t: bench.semla(t))),
                       f"kmeans-{cfg.kmeans}": tick(each(lambda t: bench.semla(t, centroids=km)))}
    ab["fusion"] = {f: tick(each(lambda t: bench.semla(t, fusion=f))) for f in FUSIONS}
    ab["dp_centroids"] = {"inf": ab["centroids"]["1"]}
    for eps in cfg.dp_epsilons:
        cents = dp_centroids(bench, eps)
        ab["dp_centroids"][str(eps)] = tick(each(lambda t: bench.semla(t, centroids=cents)))
    rng = np.random.default_rng(cfg.seed)
    sizes = {}
    for m in cfg.library_sizes:
        if m > len(targets) - 1:
            bar.update()
            continue
        scores = []
        for t in targets:
            others = bench.library(t)
            for _ in range(cfg.library_draws):
                pool = list(rng.choice(others, size=m, replace=False))
                scores.append(bench.semla(t, pool))
        sizes[str(m)] = tick(_mean(scores))
    ab["library_size"] = sizes
    bar.close()
    return ab


# -- 3. report -------------------------------------------------------------------------------------


def hmean(values) -> float:
    """Harmonic mean (as the paper reports); 0 if any value is 0."""
    values = [float(v) for v in values]
    if not values:
        return float("nan")
    if min(values) <= 0:
        return 0.0
    return round(len(values) / sum(1.0 / v for v in values), 4)


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 1e-9 else None


def headline(per_domain: dict[str, dict[str, float]], method: str, uniform: str = "uniform",
             nearest: str = "nearest") -> dict:
    """The summary keys both benchmarks report for their default method.

    ``gap_closed_hmean`` / ``gap_closed_mean``: (method − base) / (oracle − base) of the harmonic /
    arithmetic means over domains; ``wins_vs_*``: domains where the method is strictly better;
    ``worst_drop_vs_base``: the largest base − method over domains, 0 if the method is never below.
    """
    doms = list(per_domain)
    col = lambda m: [per_domain[d][m] for d in doms]  # noqa: E731
    h = {m: hmean(col(m)) for m in ("base", "oracle", method)}
    a = {m: float(np.mean(col(m))) for m in ("base", "oracle", method)}
    return {
        "method": method,
        "gap_closed_hmean": _share(h[method] - h["base"], h["oracle"] - h["base"]),
        "gap_closed_mean": _share(a[method] - a["base"], a["oracle"] - a["base"]),
        "wins_vs_uniform": sum(per_domain[d][method] > per_domain[d][uniform] for d in doms),
        "wins_vs_nearest": sum(per_domain[d][method] > per_domain[d][nearest] for d in doms),
        "worst_drop_vs_base": round(max([0.0] + [per_domain[d]["base"] - per_domain[d][method] for d in doms]), 4),
    }


def summarise(per_domain: dict[str, dict[str, float]]) -> dict:
    doms = list(per_domain)
    avg = {m: _mean(per_domain[d][m] for d in doms) for m in METHODS}
    gaps = {}
    for d in doms:
        r = per_domain[d]
        gap = r["oracle"] - r["base"]
        gaps[d] = round((r["semla"] - r["base"]) / gap, 4) if gap > 1e-9 else None
    valid = [g for g in gaps.values() if g is not None]
    beats_u = [d for d in doms if per_domain[d]["semla"] > per_domain[d]["uniform"]]
    beats_n = [d for d in doms if per_domain[d]["semla"] > per_domain[d]["nearest"]]
    whole_gap = avg["oracle"] - avg["base"]
    return {
        "average_miou": avg,
        "gap_closed_per_domain": gaps,
        "gap_closed_mean_of_domains": _mean(valid),
        "gap_closed_of_averages": round((avg["semla"] - avg["base"]) / whole_gap, 4) if whole_gap > 1e-9 else None,
        "semla_beats_uniform": len(beats_u),
        "semla_beats_nearest": len(beats_n),
        "semla_beats_both": len(set(beats_u) & set(beats_n)),
        "domains": len(doms),
        **{k: v for k, v in headline(per_domain, "semla").items() if k != "method"},
        "goal": "SemLA closes >= 70 % of the base->oracle gap on average and beats uniform and nearest "
                "on >= 16 of 20 domains",
    }


def plot(results: dict, bench: Bench, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(results["per_domain"])
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(doms) + 3), 4.2))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        ax.bar(np.arange(len(doms)) + (j - 2) * width, [results["per_domain"][d][m] for d in doms], width, label=m)
    ax.set_xticks(np.arange(len(doms)), doms, rotation=60, ha="right")
    ax.set_ylabel("mIoU (held-out test set)")
    ax.set_title("Leave-one-out: each domain's own adapter removed from the library")
    ax.legend(ncol=5, fontsize=8)
    save(fig, "semla_per_domain.png")

    gaps = results["summary"]["gap_closed_per_domain"]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(doms) + 3), 3.6))
    vals = [gaps[d] if gaps[d] is not None else 0.0 for d in doms]
    ax.bar(doms, vals, color=["tab:green" if v >= 0.7 else "tab:orange" for v in vals])
    ax.axhline(0.7, color="k", ls="--", lw=1, label="goal 0.7")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_ylabel("share of base→oracle gap closed")
    ax.tick_params(axis="x", rotation=60)
    plt.setp(ax.get_xticklabels(), ha="right")
    ax.legend(fontsize=8)
    save(fig, "semla_gap_closed.png")

    ab = results["ablations"]
    panels = [(k, v) for k, v in ab.items() if v]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, values) in zip(axes.flat, panels):
        keys_, ys = list(values), list(values.values())
        if name in ("temperature", "library_size"):
            ax.plot([float(k) for k in keys_], ys, marker="o")
            if name == "temperature":
                ax.set_xscale("log")
        else:
            ax.bar(keys_, ys, color="tab:blue")
            ax.tick_params(axis="x", rotation=30)
            lo = min(ys + [results["summary"]["average_miou"]["base"]])
            ax.set_ylim(max(0.0, lo - 0.05), max(ys + [results["summary"]["average_miou"]["oracle"]]) + 0.02)
        ax.axhline(results["summary"]["average_miou"]["base"], color="grey", ls=":", lw=1, label="base")
        ax.axhline(results["summary"]["average_miou"]["oracle"], color="tab:green", ls=":", lw=1, label="oracle")
        ax.set_title(name.replace("_", " "), fontsize=9)
    axes[0, 0].set_ylabel("mean mIoU (leave-one-out)")
    axes[0, 0].legend(fontsize=7)
    save(fig, "semla_ablations.png")

    cents = np.stack([bench.centroids[d][0] for d in doms])
    queries = [bench.targets[d].query.cpu().numpy() for d in doms]
    mean = cents.mean(0)
    _, _, vh = np.linalg.svd(cents - mean, full_matrices=False)
    proj = lambda x: (x - mean) @ vh[:2].T  # noqa: E731
    scenes = sorted({synth.get_domain(d).scene for d in doms})
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(scenes)}
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for d, q in zip(doms, queries):
        c = colours[synth.get_domain(d).scene]
        p = proj(q)
        ax.scatter(p[:, 0], p[:, 1], s=4, color=c, alpha=0.25)
    p = proj(cents)
    for d, (x, y) in zip(doms, p):
        ax.scatter([x], [y], s=60, color=colours[synth.get_domain(d).scene], edgecolor="k", zorder=3)
        ax.annotate(d, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for s, c in colours.items():
        ax.scatter([], [], color=c, label=s)
    ax.legend(fontsize=8, title="scene")
    ax.set_title("Centroids (large) and test-image embeddings (small), PCA", fontsize=10)
    save(fig, "semla_centroids.png")
    return written


def provenance(script: str, argv: list[str] | None, device) -> dict:
    """The command line that made a result and the machine it ran on."""
    return {"command": (f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
            "machine": {"device": str(device), "threads": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__}}


def print_table(per_domain: dict[str, dict[str, float]], methods: Sequence[str], footer: dict[str, dict] = {},
                first: int = 14, width: int = 9) -> None:
    """Domains by methods on stdout, then one line per ``footer`` entry (e.g. averages)."""
    print(f"{'domain':{first}s}" + "".join(f"{m:>{width}s}" for m in methods))
    for d, r in {**per_domain, **footer}.items():
        print(f"{d:{first}s}" + "".join(f"{r[m]:{width}.3f}" for m in methods))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"first {QUICK_DOMAINS} benchmark domains, 30 steps, small sets: minutes, for smoke tests")
    parser.add_argument("--domains", help="comma-separated domains (default: the 20 of synth.benchmark_domains())")
    parser.add_argument("--steps", type=int, help="training steps per adapter (default 300; quick 30)")
    parser.add_argument("--n-train", type=int, help="training images per domain (default 100; quick 50)")
    parser.add_argument("--n-test", type=int, help="held-out test images per domain (default 40; quick 8)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-benchmark"),
                        help="cached data, adapters and keys (reused across runs)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where semla.json and the plots go")
    parser.add_argument("--json-name", default=None, help="results file name (default semla.json; quick semla-quick.json)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablations")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    domains = args.domains.split(",") if args.domains else synth.benchmark_domains()
    if args.quick and not args.domains:
        domains = domains[:QUICK_DOMAINS]
    quick = dict(steps=30, n_train=50, n_test=8) if args.quick else {}
    over = {k: v for k, v in (("steps", args.steps), ("n_train", args.n_train), ("n_test", args.n_test)) if v}
    for d in domains:
        try:
            synth.get_domain(d)
        except UnknownNameError as exc:
            parser.error(exc.message)  # lists the valid names
    if len(domains) < 2:
        parser.error("leave-one-out needs at least two domains")
    cfg = Config(domains=tuple(domains), **{**quick, **over})
    if args.quick:
        cfg = dataclasses.replace(cfg, library_sizes=tuple(s for s in (1, 2) if s < len(domains)), library_draws=1,
                                  top_ks=(1, 0), temperatures=(0.05, 1.0), dp_epsilons=(1.0,))
    progress = not args.quiet
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)

    base = load_base()
    bundles, trained = train_adapters(cfg, workdir, base.ref.fingerprint, progress)
    t_train = time.perf_counter() - t0
    bench = pull_library(cfg, workdir, bundles, base)
    node = bench.node
    results: dict = {
        "config": {**dataclasses.asdict(cfg), "base_fingerprint": node.base.ref.fingerprint,
                   "seeds": {d: SYNTH.seeds(d) for d in cfg.domains},
                   "classes": {d: bench.targets[d].classes for d in cfg.domains}},
        "per_domain": {},
    }
    for target in tqdm(cfg.domains, desc="leave-one-out", disable=not progress):
        results["per_domain"][target] = bench.methods(target)
    results["summary"] = summarise(results["per_domain"])
    results["ablations"] = {} if args.no_ablations else run_ablations(bench, cfg, progress)
    results["plots"] = [] if args.no_plots else plot(results, bench, args.out_dir)
    results.update(provenance("semla_benchmark.py", argv, node.device))
    results["seconds"] = {"training": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}
    results["trained_this_run"] = trained  # the rest came from the work dir's cache
    name = args.json_name or ("semla-quick.json" if args.quick else "semla.json")
    (args.out_dir / name).write_text(json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    print_table(results["per_domain"], METHODS, {"average": s["average_miou"]})
    print(f"gap closed: {s['gap_closed_of_averages']} of the averages, {s['gap_closed_mean_of_domains']} mean per domain; "
          f"SemLA beats uniform on {s['semla_beats_uniform']}/{s['domains']}, nearest on "
          f"{s['semla_beats_nearest']}/{s['domains']}, both on {s['semla_beats_both']}")
    print(f"results in {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
