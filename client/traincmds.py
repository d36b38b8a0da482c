"""``semla-client synth`` and ``train``: data to train on, and a LoRA adapter bundle trained on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from semla.registry.cli_common import EXIT_OK
from semla.registry.config import TrainConfig
from semla.registry.privacy import DEFAULT_MIN_SAMPLES
from semla.schemas.errors import InvalidInputError

__all__ = ["add_parser"]


def _synth(args: argparse.Namespace) -> int:
    from semla.registry import synth

    if args.list:
        for name in synth.list_domains():
            print(f"{name:10s} {synth.get_domain(name).description}")
        return EXIT_OK
    if args.domain is None or args.out is None:
        raise InvalidInputError("synth needs --domain and --out (or --list)")
    synth.get_domain(args.domain)
    try:
        out = synth.write_dataset(args.domain, args.n, args.seed, args.out, size=args.size, progress=True)
    except FileExistsError as exc:
        raise InvalidInputError(str(exc)) from None
    print(f"wrote {args.n} {args.domain} images to {out}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from semla.registry.data import scan_dataset

    config = TrainConfig(
        steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, batch_size=args.batch, seed=args.seed,
        version=args.version, min_samples=args.min_samples, centroids=args.centroids, domain=args.domain,
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
    )
    if args.out.exists():
        raise InvalidInputError(f"{args.out} already exists; choose a new --out")
    scan_dataset(args.data, min_samples=config.min_samples)  # bad input fails before torch and the model load

    from semla.registry.device import resolve_device
    from semla.registry.model import load_base
    from semla.registry.train import train_adapter

    device = resolve_device(args.device)
    base = load_base(args.base, args.pretrained, device=device)
    manifest = train_adapter(args.data, args.out, args.name, config, base=base, progress=True)
    dp = f", DP epsilon {manifest.privacy.epsilon:g} delta {manifest.privacy.delta:g}" if args.dp_epsilon else ""
    print(f"wrote unsigned bundle {args.out} ({manifest.name} v{manifest.version}, "
          f"{manifest.sample_count} samples, rank {manifest.rank}{dp})")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add this module's commands to ``semla-client``."""
    p = sub.add_parser("synth", help="write a synthetic segmentation data set")
    p.add_argument("--list", action="store_true", help="list the synthetic domains and exit")
    p.add_argument("--domain", help="domain name (see --list)")
    p.add_argument("--n", type=int, default=60, help="number of images (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--out", type=Path, help="output directory (must not exist or be empty)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a LoRA adapter and write an unsigned bundle")
    p.add_argument("--data", type=Path, required=True, help="DIR with images/, masks/ and classes.txt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--name", required=True, help="adapter name: lower-case letters, digits, . _ -")
    d = TrainConfig  # the defaults, defined once (registry/config.py)
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha; scale = alpha / r (default {d.alpha:g})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--version", type=int, default=d.version,
                   help=f"adapter version, > the last published (default {d.version})")
    p.add_argument("--centroids", type=int, default=d.centroids,
                   help=f"retrieval centroids, 1 or k-means up to 8 (default {d.centroids})")
    p.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                   help=f"refuse fewer images than this (default {DEFAULT_MIN_SAMPLES})")
    p.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                   help="Gaussian DP on the centroid and sample count with this epsilon (k = 1 centroid only; "
                   "analytic Gaussian mechanism, unit-norm clipping); default: published exactly")
    p.add_argument("--dp-delta", type=float, default=d.dp_delta, metavar="D", help=f"DP delta (default {d.dp_delta:g})")
    p.add_argument("--domain", help="domain description to publish (default: from DIR/domain.json or the name)")
    p.add_argument("--base", default="semla-tiny", help="base model architecture (default semla-tiny)")
    p.add_argument("--pretrained", default=None,
                   help="base weights: default bundled for semla-tiny; an open_clip tag (openai), a path or local-dir:DIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=_train)
