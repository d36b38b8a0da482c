"""The paper-shaped SemLA benchmark: 20 domains from 10 datasets, leave-one-out, the paper's reporting.

Like the paper (Qorbani et al., CVPR 2025): 16 driving domains from 6 datasets (one with 8 weather x
time conditions like MUSES, one with 4 adverse conditions like ACDC, single-condition ones like
Cityscapes, BDD100K, Mapillary Vistas and IDD) and 4 general or indoor ones (like ADE20K,
PASCAL-Context, NYUv2, COCONut), all from :mod:`semla.registry.synth.paper`; a base model
retrained on a separate source set (COCO-Stuff's role). Stages, each cached in ``--workdir``:

1. **Base** (``base/``, keyed by a hash of its settings): semla-tiny trained from scratch on the
   source set (:func:`semla.registry.synth.paper.render_source`). About 20 min on 2 CPU cores
   with the defaults (1500 images per scene type, 2500 steps); skipped with ``--pretrained``.
2. **Adapters** (``bundles/``, keyed by domain, settings and the base fingerprint): one
   ``semla-client train`` per domain; then one owner per domain signs and publishes to a
   registry on 127.0.0.1 (given the base's card), and a node pulls and verifies every adapter.
3. **Hyper-parameters, by nested leave-one-out** on training images only: for each target, for
   every other (library) domain ``i``, the library without the target and without ``i`` segments
   ``--n-inner`` of ``i``'s own training images (which no adapter in that inner library saw);
   the setting with the best harmonic mean over the ``i`` wins. The target's images, test or
   training, are never used. Chosen per target and recorded.
4. **Leave-one-out evaluation** of base, oracle, uniform merge, nearest adapter, SemLA with the
   paper's weights (``softmax((1/d)/T)``, T 0.05, top-5), SemLA with the default (``calibrated``)
   and the default with the guard (weight for the base when a query is outside the library).
   A diagnostic beside them (``ceiling``): each library adapter alone on each target's test set,
   and the share of the gap the best of them closes when picked with the test labels.

Results: ``benchmarks/results/semla_paper.json`` (per-domain table, arithmetic and harmonic
means, share of the gap closed per domain and of the means, wins, a top-level ``summary``)
and a plot beside it.

    python benchmarks/semla_paper.py                 # full: 20 domains (see README for the time)
    python benchmarks/semla_paper.py --quick         # 3 domains, tiny steps: a smoke test
    python benchmarks/semla_paper.py --base ViT-B-16 --pretrained PATH \\
        --data cityscapes=TRAIN_DIR:TEST_DIR --data acdc_fog=... # real folders (semla-client import)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import semla_benchmark as sb  # noqa: E402
from semla.registry.synth import paper as synth_paper  # noqa: E402
from semla.registry.data import load_dataset  # noqa: E402
from semla.registry.model import TINY, load_base  # noqa: E402
from semla.registry.retrieval import CentroidTable, retrieve_torch  # noqa: E402
from semla.registry.train_base import train_base  # noqa: E402

ROOT = sb.ROOT
METHODS = ("base", "oracle", "uniform", "nearest", "semla_paper", "semla", "semla_guard")
DEFAULT = "semla"
QUICK_DOMAINS = ("allweather_fog", "adverse_fog", "metro")
PAPER_WEIGHTING = {"weighting": "paper", "temperature": 0.05, "top_k": 5}  # the released configuration


@dataclasses.dataclass(frozen=True)
class PaperConfig(sb.Config):
    n_inner: int = 8  # training images per library domain for the nested leave-one-out
    base_images: int = 1500  # source images per scene type
    base_steps: int = 2500
    base_batch: int = 32
    batch: int = 16  # adapter training batch
    min_samples: int = 50
    # the nested leave-one-out grid: calibrated temperature (in units of the library's scale) x top-k,
    # then the guard's threshold (in units of the nearest adapter's spread)
    temperatures: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # calibrated: in units of the adapters' spreads
    top_ks: tuple[int, ...] = (1, 3, 5, 0)  # 0: the whole library
    guard_zs: tuple[float | None, ...] = (None, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0, 24.0)  # None: the library's own default


PAPER = sb.generated("paper-shaped", synth_paper, synth_paper.classes, lambda d: synth_paper.get_domain(d).description)


def real_source(dirs: dict[str, tuple[Path, Path]]) -> sb.DataSource:
    """Real dataset folders (``images/``, ``masks/``, ``classes.txt``; what ``semla-client import`` writes)."""

    def load(domain: str, n: int, which: int):
        data = load_dataset(dirs[domain][which], limit=n)
        return list(data.images), list(data.masks)

    def key(domain: str) -> dict:
        train = dirs[domain][0]
        files = sorted(p for p in train.rglob("*") if p.is_file())
        return {"train_dir": str(train.resolve()), "files": len(files),
                "mtime": max((p.stat().st_mtime_ns for p in files), default=0)}

    return sb.DataSource(
        "real", classes=lambda d: load_dataset(dirs[d][0], limit=1).classes, description=lambda d: d, key=key,
        train_dir=lambda d, n, out: dirs[d][0], train_set=lambda d, n: load(d, n, 0),
        test_set=lambda d, n: load(d, n, 1))


# -- 1. the base ---------------------------------------------------------------------------------------


def base_file(cfg: PaperConfig, workdir: Path) -> Path:
    """Where the base trained with these settings is cached."""
    blob = json.dumps({"images": cfg.base_images, "steps": cfg.base_steps, "batch": cfg.base_batch, "seed": cfg.seed,
                       "source": "synth_paper.render_source/1"}, sort_keys=True)
    return workdir / "base" / f"{TINY}-source-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"


def base_stage(cfg: PaperConfig, workdir: Path, progress: bool) -> tuple[Path, float]:
    """semla-tiny trained on the source set, cached by its settings: (weights path, seconds spent now)."""
    out = base_file(cfg, workdir)
    if out.is_file():
        return out, 0.0
    t0 = time.perf_counter()
    train_base(out, n_images=cfg.base_images, steps=cfg.base_steps, batch_size=cfg.base_batch, seed=cfg.seed,
               progress=progress,
               source=synth_paper.render_source)
    return out, time.perf_counter() - t0


# -- 2. weighting ---------------------------------------------------------------------------------------


class PaperBench(sb.Bench):
    """The pulled library, test sets, and inner (training-image) sets for the nested leave-one-out."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.inner = {d: self.prepare(d, *self.data.train_set(d, self.cfg.n_inner)) for d in self.cfg.domains}

    def weigh(self, queries: torch.Tensor, lib: Sequence[str], *, weighting: str, temperature: float | None,
              top_k: int, guard: bool = False, guard_z: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, weights) over ``lib`` for each query, by :mod:`semla.registry.weighting` with each adapter's
        published spread; with the guard the weights sum to 1 − the base's weight (the base is a zero adapter)."""
        table = CentroidTable.from_lists([self.centroids[d] for d in lib], [self.spreads[d] for d in lib])
        k = min(top_k or len(lib), len(lib))
        idx, _, w = retrieve_torch(queries, table, top_k=k, temperature=temperature, weighting=weighting,
                                   distance=self.cfg.distance, guard=guard, guard_z=guard_z)
        return idx, w

    def fused(self, target: str | sb.Target, lib: Sequence[str], **kw) -> float:
        t = target if isinstance(target, sb.Target) else self.targets[target]
        idx, w = self.weigh(t.query, lib, **kw)
        return self.miou(t, lib, idx, w)

    # -- 3. nested leave-one-out on training images ---------------------------------------------------
    def choose(self, target: str) -> dict:
        """The default's (T, k) and the guard's z for ``target``, from the other domains' training images."""
        lib = self.library(target)
        inner = [i for i in lib if len(lib) > 1]
        if not inner:
            return {"temperature": self.cfg.temperatures[0], "top_k": self.cfg.top_ks[0], "guard_z": self.cfg.guard_zs[0],
                    "inner_domains": 0}

        def score(**kw) -> float:
            return sb.hmean(self.fused(self.inner[i], [d for d in lib if d != i], **kw) for i in inner)

        grid = {(T, k): score(weighting="calibrated", temperature=T, top_k=k)
                for T in self.cfg.temperatures for k in self.cfg.top_ks}
        T, k = max(grid, key=lambda key: (grid[key], -key[0]))
        guards = {z: score(weighting="calibrated", temperature=T, top_k=k, guard=True, guard_z=z)
                  for z in self.cfg.guard_zs}
        z = max(guards, key=lambda key: (guards[key], key if key is not None else -1.0))
        return {"temperature": T, "top_k": k, "guard_z": z, "inner_domains": len(inner),
                "inner_hmean": round(grid[(T, k)], 4), "inner_hmean_guard": round(guards[z], 4)}

    def paper_methods(self, target: str, chosen: dict) -> dict[str, float]:
        lib = self.library(target)
        out = self.methods(target)
        del out["semla"]
        default = {"weighting": "calibrated", "temperature": chosen["temperature"], "top_k": chosen["top_k"]}
        out["semla_paper"] = self.fused(target, lib, **PAPER_WEIGHTING)
        out["semla"] = self.fused(target, lib, **default)
        out["semla_guard"] = self.fused(target, lib, **default, guard=True, guard_z=chosen["guard_z"])
        return {m: out[m] for m in METHODS}

    def single_adapters(self, target: str) -> dict[str, float]:
        """Each library adapter alone on the target's test set (a diagnostic, not a method)."""
        b = len(self.targets[target].masks)
        one = (torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1))
        return {j: self.miou(target, [j], *one) for j in self.library(target)}


# -- 4. report ------------------------------------------------------------------------------------------


def report(per_domain: dict[str, dict[str, float]]) -> dict:
    doms = list(per_domain)
    col = lambda m: [per_domain[d][m] for d in doms]  # noqa: E731
    means = {m: sb._mean(col(m)) for m in METHODS}
    hmeans = {m: sb.hmean(col(m)) for m in METHODS}
    gap = {}
    for m in METHODS[2:]:
        per = {}
        for d in doms:
            r = per_domain[d]
            per[d] = sb._share(r[m] - r["base"], r["oracle"] - r["base"])
        raw = {k: float(np.mean(col(k))) for k in ("base", "oracle", m)}  # unrounded, as in the summary
        gap[m] = {"of_mean": sb._share(raw[m] - raw["base"], raw["oracle"] - raw["base"]),
                  "of_hmean": sb._share(hmeans[m] - hmeans["base"], hmeans["oracle"] - hmeans["base"]),
                  "per_domain": per}
    wins = {m: {other: sum(per_domain[d][m] > per_domain[d][other] for d in doms)
                for other in METHODS if other != m} for m in ("semla", "semla_guard", "semla_paper")}
    return {"mean": means, "hmean": hmeans, "gap_closed": gap, "wins": wins, "domains": len(doms)}


def ceiling(per_domain: dict[str, dict[str, float]], singles: dict[str, dict[str, float]]) -> dict:
    """What the library can give at best when one adapter serves a domain: per domain the best
    library adapter alone, picked with the test labels (an upper bound, like the oracle: no
    method can pick it), and the share of the base→oracle gap that closes."""
    best = {d: max(row, key=row.get) for d, row in singles.items()}
    col = {d: singles[d][best[d]] for d in best}
    doms = list(best)
    # the same gap shares as the summary's, of a column holding the best single adapter
    gap = sb.headline({d: {**per_domain[d], "best_single": col[d]} for d in doms}, "best_single",
                      uniform="best_single", nearest="best_single")
    return {
        "what": "each library adapter alone on each target's test set; best_single: the best of them per "
                "domain, chosen with the test labels (an upper bound on any method that picks one adapter; "
                "not a method)",
        "best_single": {d: {"adapter": best[d], "miou": col[d]} for d in doms},
        "gap_closed_hmean": gap["gap_closed_hmean"],
        "gap_closed_mean": gap["gap_closed_mean"],
        "domains_where_every_library_adapter_is_below_base": [
            d for d in doms if col[d] < per_domain[d]["base"]],
        "single_adapter_miou": singles,
    }


def plot(results: dict, out_dir: Path, stem: str = "semla_paper") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(results["per_domain"])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(9, 0.75 * len(doms) + 3), 7.5))
    width = 0.85 / len(METHODS)
    for j, m in enumerate(METHODS):
        ax.bar(np.arange(len(doms)) + (j - len(METHODS) / 2 + 0.5) * width,
               [results["per_domain"][d][m] for d in doms], width, label=m)
    ax.set_xticks(np.arange(len(doms)), doms, rotation=55, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (held-out test set)")
    ax.set_title("Paper-shaped benchmark, leave-one-out")
    ax.legend(ncol=len(METHODS), fontsize=7)
    gaps = results["report"]["gap_closed"]
    for j, m in enumerate(("uniform", "nearest", "semla_paper", "semla", "semla_guard")):
        vals = [gaps[m]["per_domain"][d] if gaps[m]["per_domain"][d] is not None else 0.0 for d in doms]
        ax2.bar(np.arange(len(doms)) + (j - 2) * 0.16, vals, 0.16, label=m)
    ax2.axhline(0.75, color="k", ls="--", lw=1, label="goal 0.75 (hmean)")
    ax2.axhline(0.0, color="grey", lw=0.8)
    ax2.set_xticks(np.arange(len(doms)), doms, rotation=55, ha="right", fontsize=8)
    ax2.set_ylim(-1.0, 1.2)
    ax2.set_ylabel("share of base→oracle gap closed")
    ax2.legend(ncol=6, fontsize=7)
    fig.tight_layout()
    name = f"{stem}.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return [name]


def markdown(results: dict) -> str:
    """The README's tables from a results file: per domain, means, gap closed, wins, the summary."""
    rep, doms = results["report"], list(results["per_domain"])
    ds = results.get("datasets") or {}
    head = "| domain | like | " + " | ".join(METHODS) + " | gap closed (default) |"
    lines = [head, "|" + "---|" * (len(METHODS) + 3)]
    for d in doms:
        r, g = results["per_domain"][d], rep["gap_closed"][DEFAULT]["per_domain"][d]
        best = max(r[m] for m in METHODS[2:])
        cells = [f"**{r[m]:.3f}**" if m in METHODS[2:] and r[m] == best else f"{r[m]:.3f}" for m in METHODS]
        lines.append(f"| {d} | {ds.get(d, {}).get('like', '')} | " + " | ".join(cells) + f" | {'–' if g is None else f'{g:.2f}'} |")
    for label, key in (("mean", "mean"), ("harmonic mean", "hmean")):
        lines.append(f"| **{label}** | | " + " | ".join(f"{rep[key][m]:.3f}" for m in METHODS) + " | |")
    lines += ["", "| method | gap closed (hmean) | gap closed (mean) | wins vs base | wins vs uniform | wins vs nearest |",
              "|---|---|---|---|---|---|"]
    for m in ("uniform", "nearest", "semla_paper", "semla", "semla_guard"):
        g = rep["gap_closed"][m]
        w = rep["wins"].get(m, {})
        lines.append(f"| {m} | {g['of_hmean']} | {g['of_mean']} | {w.get('base', '')} | {w.get('uniform', '')} | "
                     f"{w.get('nearest', '')} |")
    s = results["summary"]
    lines += ["", f"summary (default): gap closed {s['gap_closed_hmean']} (hmean), {s['gap_closed_mean']} (mean); "
              f"beats uniform on {s['wins_vs_uniform']}/{len(doms)}, nearest on {s['wins_vs_nearest']}/{len(doms)}; "
              f"worst drop vs base {s['worst_drop_vs_base']}"]
    c = results.get("ceiling")
    if c is not None:
        below = ", ".join(c["domains_where_every_library_adapter_is_below_base"]) or "none"
        lines += ["", f"ceiling (a diagnostic): the best library adapter alone per domain, picked with the test labels, "
                  f"closes {c['gap_closed_hmean']} of the gap (hmean), {c['gap_closed_mean']} (mean); every library "
                  f"adapter is below the base on: {below}"]
    return "\n".join(lines)


def _parse_data(values: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, tuple[Path, Path]]:
    dirs = {}
    for v in values:
        name, _, paths = v.partition("=")
        train, _, test = paths.partition(":")
        if not name or not train or not test:
            parser.error(f"--data {v!r}: expected NAME=TRAIN_DIR:TEST_DIR")
        for p in (train, test):
            if not (Path(p) / "classes.txt").is_file():
                parser.error(f"--data {name}: {p} has no classes.txt (make it with `semla-client import`)")
        dirs[name] = (Path(train), Path(test))
    return dirs


def _eta(cfg: PaperConfig, base_cached: bool, todo: int) -> float:
    """A rough estimate on 2 idle CPU cores: base step 0.45 s, source image 0.08 s, adapter step 0.3 s,
    0.02 s per image per fused evaluation (several times longer when other work shares the cores)."""
    n = len(cfg.domains)
    grid = len(cfg.temperatures) * len(cfg.top_ks) + len(cfg.guard_zs)
    return ((0 if base_cached else 0.45 * cfg.base_steps + 0.08 * 4 * cfg.base_images) + todo * 0.3 * cfg.steps
            + 0.02 * n * (n - 1) * grid * cfg.n_inner + 0.02 * n * cfg.n_test * len(METHODS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 domains, tiny base and adapters: a smoke test")
    parser.add_argument("--domains", help="comma-separated domains (default: the 20 of synth_paper.paper_domains())")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=TRAIN_DIR:TEST_DIR",
                        help="a real dataset folder pair (repeat; replaces the synthetic domains)")
    parser.add_argument("--base", default=TINY, help="base architecture (default semla-tiny, retrained on the source set)")
    parser.add_argument("--pretrained", default=None, help="base weights: skips the base stage (a real CLIP needs it)")
    parser.add_argument("--steps", type=int, help="adapter training steps (default 300; quick 10)")
    parser.add_argument("--n-train", type=int, help="training images per domain (default 100; quick 10)")
    parser.add_argument("--n-test", type=int, help="test images per domain (default 40; quick 4)")
    parser.add_argument("--n-inner", type=int, help="training images per domain for the nested leave-one-out (default 8; quick 3)")
    parser.add_argument("--base-images", type=int, help="source images per scene type (default 1500; quick 8)")
    parser.add_argument("--base-steps", type=int, help="base training steps (default 2500; quick 6)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-paper"), help="cache (base, data, adapters, keys)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--json-name", default=None, help="default semla_paper.json (quick: semla_paper-quick.json)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the README's markdown tables from a results file")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return 0

    real = _parse_data(args.data, parser) if args.data else None
    if real is not None:
        domains = list(real)
    else:
        domains = args.domains.split(",") if args.domains else (list(QUICK_DOMAINS) if args.quick
                                                                else synth_paper.paper_domains())
        for d in domains:
            if d not in synth_paper.DOMAINS:
                parser.error(f"unknown domain {d!r}; valid: {', '.join(synth_paper.DOMAINS)}")
    if len(domains) < 2:
        parser.error("leave-one-out needs at least two domains")
    if args.base != TINY and args.pretrained is None:
        parser.error(f"--base {args.base} needs --pretrained PATH (only {TINY} is trained here)")
    quick = dict(steps=10, n_train=10, n_test=4, n_inner=3, base_images=8, base_steps=6, base_batch=8, batch=4,
                 min_samples=8,
                 temperatures=(0.5, 2.0), top_ks=(1, 0), guard_zs=(None, 2.0)) if args.quick else {}
    over = {k: v for k, v in (("steps", args.steps), ("n_train", args.n_train), ("n_test", args.n_test),
                              ("n_inner", args.n_inner), ("base_images", args.base_images),
                              ("base_steps", args.base_steps)) if v}
    cfg = PaperConfig(domains=tuple(domains), **{**quick, **over})
    data = real_source(real) if real is not None else PAPER
    workdir, progress, t0 = args.workdir, not args.quiet, time.perf_counter()
    for folder in (workdir, args.out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    base_path = args.pretrained
    base_cached = base_path is not None or base_file(cfg, workdir).is_file()
    print(f"semla_paper: {len(domains)} domains; rough estimate on 2 CPU cores before caching: "
          f"{_eta(cfg, bool(base_cached), len(domains)) / 60:.1f} min", file=sys.stderr)
    t_base = 0.0
    if base_path is None:
        path, t_base = base_stage(cfg, workdir, progress)
        base_path = str(path)
    base = load_base(args.base, base_path)
    extra = ["--base", args.base, "--pretrained", str(base_path), "--min-samples", str(cfg.min_samples),
             "--batch", str(cfg.batch)]
    t1 = time.perf_counter()
    bundles, trained = sb.train_adapters(cfg, workdir, base.ref.fingerprint, progress, data, extra)
    t_train = time.perf_counter() - t1
    bench = sb.pull_library(cfg, workdir, bundles, base, data, bench_cls=PaperBench)

    results: dict = {
        "benchmark": "paper-shaped" if real is None else "real folders",
        "config": {**dataclasses.asdict(cfg), "base": args.base, "base_weights": Path(base_path).name,
                   "base_fingerprint": base.ref.fingerprint,
                   "seeds": {d: data.seeds(d) for d in cfg.domains},
                   "classes": {d: bench.targets[d].classes for d in cfg.domains},
},
        "datasets": None if real is not None else {
            d: {"dataset": synth_paper.get_domain(d).dataset,
                "like": synth_paper.DATASETS[synth_paper.get_domain(d).dataset].like,
                "kind": synth_paper.DATASETS[synth_paper.get_domain(d).dataset].kind,
                "condition": list(synth_paper.get_domain(d).condition)} for d in cfg.domains},
        "methods": {
            "base": "no adapter", "oracle": "the target's own adapter (upper bound)",
            "uniform": "every library adapter at weight 1/n, exact fusion", "nearest": "the nearest adapter alone",
            "semla_paper": "the released code's softmax((1/d)/T), T 0.05, top-5",
            "semla": "the default: calibrated, softmax(-z/T) with z the distance in the library's unit u (the "
                     "median of the adapters' published q50; semla.registry.weighting); T and k chosen by nested "
                     "leave-one-out",
            "semla_guard": "the default with the guard: the base (a zero adapter) at guard_z, weighed against the "
                           "nearest adapter (sigmoid(l_base - l_nearest)); guard_z chosen by nested leave-one-out "
                           "(null: the library's own default)",
        },
        "selection": {
            "procedure": "nested leave-one-out on training images: for each target t and each library domain i "
                         f"!= t, the library without t and i segments {cfg.n_inner} of i's training images; "
                         "(T, k) maximise the harmonic mean over i, then the guard's z for that (T, k). "
                         "No image of the target (test or training) is used.",
            "grid": {"temperature": list(cfg.temperatures), "top_k": list(cfg.top_ks), "guard_z": list(cfg.guard_zs)},
            "chosen": {},
        },
        "per_domain": {},
    }
    singles = {}
    for target in tqdm(cfg.domains, desc="select + evaluate", disable=not progress):
        chosen = bench.choose(target)
        results["selection"]["chosen"][target] = chosen
        results["per_domain"][target] = bench.paper_methods(target, chosen)
        singles[target] = bench.single_adapters(target)
    results["report"] = report(results["per_domain"])
    results["ceiling"] = ceiling(results["per_domain"], singles)
    results["summary"] = sb.headline(results["per_domain"], DEFAULT)
    results["summary_guard"] = sb.headline(results["per_domain"], "semla_guard")
    name = args.json_name or ("semla_paper-quick.json" if args.quick else "semla_paper.json")
    results["plots"] = [] if args.no_plots else plot(results, args.out_dir, Path(name).stem)
    results.update(sb.provenance("semla_paper.py", argv, bench.node.device))
    results["seconds"] = {"base_training": round(t_base, 1), "adapter_training": round(t_train, 1),
                          "total": round(time.perf_counter() - t0, 1)}
    results["trained_this_run"] = trained
    (args.out_dir / name).write_text(json.dumps(results, indent=2) + "\n")

    rep = results["report"]
    sb.print_table(results["per_domain"], METHODS, {"mean": rep["mean"], "harmonic mean": rep["hmean"]}, 22, 12)
    s = results["summary"]
    print(f"default: gap closed {s['gap_closed_hmean']} (hmean), {s['gap_closed_mean']} (mean); beats uniform on "
          f"{s['wins_vs_uniform']}/{len(domains)}, nearest on {s['wins_vs_nearest']}/{len(domains)}; "
          f"worst drop vs base {s['worst_drop_vs_base']}")
    c = results["ceiling"]
    print(f"ceiling: the best library adapter alone per domain (chosen with the test labels) closes "
          f"{c['gap_closed_hmean']} of the gap (hmean), {c['gap_closed_mean']} (mean)")
    print(f"results in {args.out_dir / name}")
    return 0 if all(math.isfinite(v) for r in results["per_domain"].values() for v in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
