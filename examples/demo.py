"""End-to-end demo on loopback: a registry, three data owners, one inference node.

1. starts ``semla-server`` on 127.0.0.1 (SQLite + blobs in a work dir);
2. three owners of different domains each make a key, register it, render private data,
   train a LoRA adapter, sign and publish it over HTTP;
3. a node pulls the library, and segments held-out images of each published domain plus an
   unseen one: per image it retrieves locally, downloads and verifies only what it needs, and
   fuses exactly; it prints a table (top contributions, base vs fused mIoU) and writes overlays.

Run ``python examples/demo.py --help`` for options; ``make demo`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from semla.client.publish import publish_bundle  # noqa: E402
from semla.registry import keys, synth  # noqa: E402
from semla.registry.cli import overlay  # noqa: E402
from semla.registry.data import miou  # noqa: E402
from semla.registry.explain import explain, render, to_json  # noqa: E402
from semla.registry.http import RegistryClient  # noqa: E402
from semla.registry.model import load_base  # noqa: E402
from semla.registry.node import Node  # noqa: E402
from semla.registry.train import TrainConfig, train_adapter  # noqa: E402
from semla.server.local import local_registry  # noqa: E402

TRAIN_SEED, TEST_SEED = 100, 9000


def publish_owner(client: RegistryClient, token: str, domain: str, owner: Path, base, *, seed: int,
                  n_train: int, steps: int, progress: bool) -> dict:
    """One data owner: key, registration, private data, training, signing, upload."""
    owner.mkdir(parents=True)
    key = keys.generate_key()
    keys.save_keypair(key, owner / "owner.key")
    client.register_key(keys.public_bytes(key).hex(), token, label=f"{domain} owner")
    data = synth.write_dataset(domain, n_train, TRAIN_SEED + seed, owner / "private")
    t0 = time.perf_counter()
    train_adapter(data, owner / "bundle", domain, TrainConfig(steps=steps, seed=seed), base=base, progress=progress)
    seconds = time.perf_counter() - t0
    receipt = publish_bundle(owner / "bundle", client, key=key)
    return {"train_seconds": round(seconds, 1), "version": receipt.version, "publisher": receipt.publisher}


def test_set(domain: str, n_test: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out images of a domain (a seed no owner trains on)."""
    images, masks = zip(*(synth.render(domain, TEST_SEED, i) for i in range(n_test)))
    return list(images), list(masks)


def run(workdir: Path, domains: list[str], unseen: list[str], *, n_train: int, n_test: int, steps: int,
        top_k: int, temperature: float | None, weighting: str = "calibrated", quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    token = os.urandom(16).hex()
    base = load_base()
    results: dict = {"config": {"domains": domains, "unseen": unseen, "n_train": n_train, "n_test": n_test,
                                "steps": steps, "top_k": top_k, "temperature": temperature,
                                "base_fingerprint": base.ref.fingerprint}, "owners": {}, "domains": {}}
    with local_registry(workdir / "registry", token, log=workdir / "server.log") as url:
        say(f"registry running at {url}")
        client = RegistryClient(url)
        for i, domain in enumerate(domains):
            info = publish_owner(client, token, domain, workdir / "owners" / domain, base, seed=i, n_train=n_train,
                                 steps=steps, progress=not quiet)
            results["owners"][domain] = info
            say(f"owner {domain:6s}: trained in {info['train_seconds']:5.1f} s, published v{info['version']} "
                f"by key {info['publisher']}")

        node = Node(client, base=base, cache_dir=workdir / "node-cache")
        node.pull()
        classes = list(synth.get_scene("street").classes)
        seg = node.segmenter(classes, top_k=top_k, temperature=temperature, weighting=weighting)
        guarded = node.segmenter(classes, top_k=top_k, temperature=temperature, weighting=weighting, guard=True)
        out_dir = workdir / "overlays"
        out_dir.mkdir()
        say("")
        say(f"{'image':16s} {'top contributions (weight)':44s} {'base':>6s} {'fused':>6s}")
        for domain in domains + unseen:
            images, masks = test_set(domain, n_test)
            preds = seg.segment(images, with_base=True)
            for i, (img, pred) in enumerate(zip(images, preds)):
                pred.image = f"{domain}/{i:03d}"
                Image.fromarray(overlay(img, pred.mask, len(classes))).save(out_dir / f"{domain}-{i:03d}.png")
            base_miou = miou([p.base_mask for p in preds], masks, len(classes))
            own = seg.segment(images, adapter=domain) if domain in domains else None
            fused_miou = miou([p.mask for p in preds], masks, len(classes))
            with_guard = guarded.segment(images)
            guard_miou = miou([p.mask for p in with_guard], masks, len(classes))
            top1 = [p.contributions[0].name for p in preds]
            results["domains"][domain] = {
                "published": domain in domains, "n_test": n_test, "base_miou": round(base_miou, 4),
                "fused_miou": round(fused_miou, 4),
                "own_adapter_miou": round(miou([p.mask for p in own], masks, len(classes)), 4) if own else None,
                "top1_own_adapter_rate": round(top1.count(domain) / n_test, 4) if domain in domains else None,
                "mean_top1_weight": round(float(np.mean([p.contributions[0].weight for p in preds])), 4),
                "guard_miou": round(guard_miou, 4),
                "mean_base_weight_with_guard": round(float(np.mean([p.base_weight for p in with_guard])), 4),
            }
            for pred, mask in list(zip(preds, masks))[:2]:
                top = ", ".join(f"{c.name} {c.weight:.2f}" for c in pred.contributions[:3])
                say(f"{pred.image:16s} {top:44s} {miou([pred.base_mask], [mask], len(classes)):6.3f} "
                    f"{miou([pred.mask], [mask], len(classes)):6.3f}")
            r = results["domains"][domain]
            hit = f"top-1 own adapter {r['top1_own_adapter_rate']:.0%}" if domain in domains else "(unseen domain)"
            say(f"{domain + ' (all)':16s} {hit:44s} {base_miou:6.3f} {fused_miou:6.3f}")
        say("")
        for domain in domains + unseen:  # what the guard did: the base's share where the library does not reach
            r = results["domains"][domain]
            kind = "published" if domain in domains else "UNSEEN"
            say(f"guard on {domain} ({kind}): base mIoU {r['base_miou']:.3f}, fused {r['fused_miou']:.3f} without the "
                f"guard, {r['guard_miou']:.3f} with it; mean base weight {r['mean_base_weight_with_guard']:.2f}")
        explain_dir = workdir / "explain"
        explain_dir.mkdir()
        for domain in domains + unseen:
            image = test_set(domain, 1)[0][0]
            e = explain(node, image, classes, top_k=top_k, temperature=temperature, weighting=weighting)
            render(e, image, classes).save(explain_dir / f"{domain}.explain.png")
            (explain_dir / f"{domain}.explain.json").write_text(json.dumps(to_json(e, f"{domain}/000", classes), indent=2))
        say(f"\noverlays in {out_dir}; explanations (which adapter changed which pixels) in {explain_dir}")
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo-out"), help="work dir (replaced)")
    parser.add_argument("--domains", default="fog,night,snow", help="published domains, one owner each")
    parser.add_argument("--unseen", default="rain", help="domains segmented without an adapter of their own")
    parser.add_argument("--n-train", type=int, default=60, help="private images per owner")
    parser.add_argument("--n-test", type=int, default=30, help="held-out images per domain")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=None, help="default: the weighting's own")
    parser.add_argument("--weighting", default="calibrated", help="calibrated (default), neg-distance or paper")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    run(args.workdir, args.domains.split(","), [d for d in args.unseen.split(",") if d], n_train=args.n_train,
        n_test=args.n_test, steps=args.steps, top_k=args.top_k, temperature=args.temperature, weighting=args.weighting)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {args.workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
