"""``semla-node base-card``: compute a base model's card for ``semla-server bases add``.

Kept apart from :mod:`semla.registry.basecard`, which the node imports: a command module may
import the CLI helpers, the node's own dependencies may not.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from semla.registry.cli_common import EXIT_OK
from semla.registry.fs import write_durable
from semla.registry.basecard import compute_base_card
from semla.schemas.basecard import CardBounds
from semla.schemas.errors import InvalidInputError

__all__ = ["add_parser"]


def _base_card(args: argparse.Namespace) -> int:
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
