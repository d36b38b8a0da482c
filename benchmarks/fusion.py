"""Fusion speed and exactness: our mixture and merged paths against peft, on one box.

For each model (semla-tiny with its bundled weights; ViT-B-16 at random init, which is as
good as pretrained weights for timing), batch size and k, with a library of adapters of mixed
ranks (8 and 16) and per-image random top-k weights, this measures in one run:

* ``base``: the dense forward with no adapter;
* ``mixture``: our per-image path (``W x + B diag(w_b ⊗ s) A x``, one GEMM pair a layer), with
  the layout it picks by itself, and each layout forced (``concat``: every image times the
  batch's union of adapters; ``gather``: each image only its own top-k, batched GEMMs);
* ``merged_cold`` / ``merged_warm``: our merged path for a batch sharing one weight vector,
  including / excluding the merge itself (a stream of one domain merges once);
* ``naive peft per-image merge``: what a SemLA user does with peft today:
  ``add_weighted_adapter(..., combination_type="cat")`` for every image, then its forward;
* ``peft adapter_names``: peft's own mixed-batch path (k = 1 only: one adapter per image);

and checks each against the dense reference (``W + Σ w s B A`` materialised per image).
It also times retrieval over 1M centroids. Results: benchmarks/results/fusion.json.

    python benchmarks/fusion.py              # full grid (CPU: ~10 minutes on 2 cores)
    python benchmarks/fusion.py --quick      # seconds, for a smoke test
    python benchmarks/fusion.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import peft
import torch

from semla.registry.fusion import FusionEngine, LoraAdapter
from semla.registry.model import load_base, lora_target_modules
from semla.registry.retrieval import CentroidTable, retrieve_torch

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def make_library(model, n: int, seed: int) -> list[LoraAdapter]:
    gen = torch.Generator().manual_seed(seed)
    library = []
    for i in range(n):
        rank = 8 if i % 2 == 0 else 16
        A, B = {}, {}
        for name in lora_target_modules(model.clip):
            lin = model.clip.get_submodule(name)
            A[name] = (torch.randn(rank, lin.in_features, generator=gen) / lin.in_features**0.5).to(model.device)
            B[name] = (torch.randn(lin.out_features, rank, generator=gen) * 0.02).to(model.device)
        library.append(LoraAdapter(key=f"a{i}", scale=2.0 * 8 / rank, A=A, B=B))
    return library


def per_image_weights(n_images: int, n_lib: int, k: int, seed: int) -> torch.Tensor:
    """(B, n_lib) weights: k random adapters per image, softmax weights, zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(n_images, n_lib)
    for b in range(n_images):
        idx = torch.randperm(n_lib, generator=gen)[:k]
        w[b, idx] = torch.softmax(torch.randn(k, generator=gen), 0)
    return w


def dense_reference(model, library, weights_row, pixels):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in lora_target_modules(ref.clip):
            lin = ref.clip.get_submodule(name)
            for a, w in zip(library, weights_row.tolist()):
                if w:
                    lin.weight.add_(w * a.delta(name))
        return ref.encode_dense(pixels)


def peft_model_with(model, library):
    """A peft-wrapped copy of the model holding every library adapter by name."""
    clone = copy.deepcopy(model)
    targets = lora_target_modules(clone.clip)
    pm = None
    for a in library:
        rank = next(iter(a.A.values())).shape[0]
        config = peft.LoraConfig(r=rank, lora_alpha=a.scale * rank, target_modules=targets, lora_dropout=0.0)
        if pm is None:
            pm = peft.get_peft_model(clone.clip, config, adapter_name=a.key)
        else:
            pm.add_adapter(a.key, config)
        with torch.no_grad():
            for name in targets:
                layer = pm.base_model.model.get_submodule(name)
                layer.lora_A[a.key].weight.copy_(a.A[name])
                layer.lora_B[a.key].weight.copy_(a.B[name])
    pm.eval()
    return clone, pm


def bench_model(arch: str, batches: list[int], ks: list[int], device: torch.device, reps: int, n_lib: int) -> dict:
    model = load_base(arch, None if arch == "semla-tiny" else "none", device=device)
    library = make_library(model, n_lib, seed=0)
    engine_model = copy.deepcopy(model)
    engine = FusionEngine(engine_model.clip, lora_target_modules(engine_model.clip))
    peft_clone, pm = peft_model_with(model, library)
    size = model.image_size
    rows = []
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
        base_ms = timed(lambda: model.encode_dense(pixels), device, reps)
        for k in ks:
            w = per_image_weights(batch, n_lib, k, seed=batch * 10 + k).to(device)
            row = {"batch": batch, "k": k, "base_ms": round(base_ms, 3)}
            with torch.no_grad():
                used = [i for i in range(n_lib) if w[:, i].any()]  # the node fuses only what the batch needs
                batch_lib, batch_w = [library[i] for i in used], w[:, used]

                def mixture(layout="auto"):
                    engine.set_mixture(batch_lib, batch_w, layout=layout)
                    out = engine_model.encode_dense(pixels)
                    engine.clear()
                    return out

                row["mixture_ms"] = round(timed(mixture, device, reps), 3)
                for layout in ("concat", "gather"):
                    row[f"mixture_{layout}_ms"] = round(timed(lambda: mixture(layout), device, reps), 3)
                shared = w[0]

                def merged_cold():
                    engine.unmerge()
                    engine.merge(library, shared)
                    return engine_model.encode_dense(pixels)

                row["merged_cold_ms"] = round(timed(merged_cold, device, reps), 3)
                engine.merge(library, shared, key="warm")
                row["merged_warm_ms"] = round(timed(lambda: engine_model.encode_dense(pixels), device, reps), 3)
                engine.unmerge()

                names = [a.key for a in library]

                def naive():
                    outs = []
                    for b in range(batch):
                        nz = [i for i in range(n_lib) if w[b, i] > 0]
                        pm.add_weighted_adapter([names[i] for i in nz], [float(w[b, i]) for i in nz], "mix",
                                                combination_type="cat")
                        pm.set_adapter("mix")
                        outs.append(peft_clone.encode_dense(pixels[b : b + 1]))
                        pm.delete_adapter("mix")
                    return torch.cat(outs)

                row["naive_peft_per_image_merge_ms"] = round(timed(naive, device, max(1, reps // 3)), 3)
                if k == 1:
                    per_image = [names[int(w[b].argmax())] for b in range(batch)]

                    def peft_names():
                        with pm.base_model._enable_peft_forward_hooks(adapter_names=per_image):
                            return peft_clone.encode_dense(pixels)

                    row["peft_adapter_names_ms"] = round(timed(peft_names, device, reps), 3)

                # exactness on the first two images against the dense reference
                check = min(batch, 2)
                ref = torch.cat([dense_reference(model, library, w[b], pixels[b : b + 1]) for b in range(check)])
                engine.set_mixture(library, w[:check])
                err = {"mixture": (engine_model.encode_dense(pixels[:check]) - ref).abs().max().item()}
                engine.clear()
                engine.merge(library, w[0])
                err["merged"] = (engine_model.encode_dense(pixels[:1]) - ref[:1]).abs().max().item()
                engine.unmerge()
                err["naive_peft_per_image_merge"] = (naive()[:check] - ref).abs().max().item()
                if k == 1:
                    err["peft_adapter_names"] = (peft_names()[:check] - ref).abs().max().item()
                row["max_abs_err_vs_dense"] = {m: float(f"{e:.3g}") for m, e in err.items()}
            row["mixture_over_base"] = round(row["mixture_ms"] / base_ms, 3)
            row["naive_over_mixture"] = round(row["naive_peft_per_image_merge_ms"] / row["mixture_ms"], 1)
            rows.append(row)
            print(json.dumps({"arch": arch, **row}), flush=True)
    return {"arch": arch, "weights": "bundled" if arch == "semla-tiny" else "random init", "library": n_lib,
            "ranks": "8 and 16 alternating", "rows": rows}


def bench_retrieval(n: int, dim: int, device: torch.device, reps: int) -> dict:
    gen = np.random.default_rng(0)
    vectors = gen.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = CentroidTable(vectors, np.arange(n, dtype=np.int64), n)
    out = {"centroids": n, "dim": dim}
    for q in (1, 16):
        queries = torch.randn(q, dim, device=device)
        out[f"batch{q}_ms"] = round(timed(lambda: retrieve_torch(queries, table, top_k=5, device=device), device,
                                          reps), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny grid, semla-tiny only, no 1M retrieval")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/fusion.json (quick: /tmp/fusion-quick.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out or (Path("/tmp/fusion-quick.json") if args.quick else ROOT / "benchmarks/results/fusion.json")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.quick:
        models = [bench_model("semla-tiny", [1, 4], [1, 3], device, reps=2, n_lib=4)]
        retrieval = bench_retrieval(10_000, 64, device, reps=3)
    else:
        models = [bench_model("semla-tiny", [1, 16, 64], [1, 3, 5], device, reps=7, n_lib=8)]
        vit_batches = [1, 16, 64] if device.type == "cuda" else [1, 16]
        models.append(bench_model("ViT-B-16", vit_batches, [1, 3, 5], device, reps=3 if device.type == "cpu" else 20,
                                  n_lib=8))
        retrieval = bench_retrieval(1_000_000, 512, device, reps=10)
    result = {
        "command": ("python benchmarks/fusion.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "note": None if device.type == "cuda" else "CPU figures (no GPU on this machine); ViT-B-16 batch 64 skipped on CPU",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "models": models,
        "retrieval": retrieval,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
