"""Compute a base model's card (needs torch, imported on use), and ``semla-node base-card``.

The card (:class:`~semla.schemas.basecard.BaseCard`) is what the torch-free registry checks
adapters against; it is computed here from a loaded model: each LoRA target's sizes and
``||W||_F``, and the retrieval embedding's name and dimension (one embedding of a blank image).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from semla.schemas.basecard import BaseCard, CardBounds, EmbeddingSpec, TargetLayer
from semla.schemas.errors import InvalidInputError

if TYPE_CHECKING:
    from semla.registry.model import DenseClip

__all__ = ["compute_base_card", "add_parser"]


def compute_base_card(base: "DenseClip", bounds: CardBounds = CardBounds()) -> BaseCard:
    """The card of a loaded base model (call before any adapter is merged into it)."""
    import torch

    from semla.registry.model import lora_target_modules

    targets = {}
    for name in lora_target_modules(base.clip):
        layer = base.clip.get_submodule(name)
        layer = getattr(layer, "base", layer)  # a FusedLinear wraps the nn.Linear
        targets[name] = TargetLayer(in_features=layer.in_features, out_features=layer.out_features,
                                    weight_norm=float(torch.linalg.norm(layer.weight.detach().double())))
    with torch.no_grad():
        blank = torch.zeros(1, 3, base.image_size, base.image_size, device=base.device)
        dim = int(base.embed(blank).shape[-1])
    return BaseCard(arch=base.ref.arch, fingerprint=base.ref.fingerprint,
                    embedding=EmbeddingSpec(name=base.embedding_model, dim=dim), targets=targets, bounds=bounds)


def _base_card(args: argparse.Namespace) -> int:
    from semla.registry._cli import EXIT_OK
    from semla.registry._fs import write_durable
    from semla.registry.model import load_base

    given = {"max_rank": args.max_rank, "max_alpha": args.max_alpha,
             "max_relative_effect": args.max_relative_effect, "max_abs_value": args.max_abs_value}
    try:
        bounds = CardBounds(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    card = compute_base_card(load_base(args.base, args.pretrained), bounds)
    data = card.to_json() + b"\n"
    if args.out is None:
        print(data.decode(), end="")
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        write_durable(tmp, data)
        os.replace(tmp, out)  # never a half-written card
        print(f"wrote the card of {card.arch} ({card.fingerprint[:16]}, {len(card.targets)} LoRA targets, "
              f"embedding {card.embedding.name} dim {card.embedding.dim}) to {out}")
    return EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``semla-node base-card``."""
    p = subparsers.add_parser(
        "base-card", help="compute a base model's card for `semla-server bases add`",
        description="Compute the card of a base model: fingerprint, arch, each LoRA target's in/out size and "
        "weight norm, the retrieval embedding's name and dimension, and the bounds adapters must keep. "
        "The registry (which has no torch) refuses adapters for bases it has no card of; install this "
        "card there with `semla-server bases add CARD.json`.")
    p.add_argument("--base", default="semla-tiny", help="base model architecture (default semla-tiny)")
    p.add_argument("--pretrained", default=None, help="base weights (see semla-client train --help)")
    p.add_argument("--out", type=Path, default=None, help="write the card here (default: stdout)")
    defaults = CardBounds()
    p.add_argument("--max-rank", type=int, default=None, help=f"largest LoRA rank (default {defaults.max_rank})")
    p.add_argument("--max-alpha", type=float, default=None, help=f"largest lora_alpha (default {defaults.max_alpha:g})")
    p.add_argument("--max-relative-effect", type=float, default=None,
                   help="largest ||s B A||_F / ||W||_F of one adapter in one layer "
                        f"(default {defaults.max_relative_effect:g})")
    p.add_argument("--max-abs-value", type=float, default=None,
                   help=f"largest |value| in a LoRA tensor (default {defaults.max_abs_value:g})")
    p.set_defaults(func=_base_card)
    return p
