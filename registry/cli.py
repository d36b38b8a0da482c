"""``semla-node``: segment images with adapters retrieved and fused on this node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semla.registry.cli_common import (EXIT_OK, add_node_arguments, add_retrieval_arguments, build_node, parse_classes,
                                       retrieval_options, run)
from semla.registry.basecard_cmd import add_parser as add_base_card_parser
from semla.registry.explain import add_parser as add_explain_parser
from semla.registry.explain import overlay, palette  # re-exported: the colours of a mask live with the pictures
from semla.registry.export import add_parser as add_fuse_parser
from semla.registry.pull import add_parser as add_pull_parser
from semla.registry.serve import add_parser as add_serve_parser
from semla.registry.retrieval import DEFAULT_TEMPERATURE, DEFAULT_TOP_K

__all__ = ["main", "build_parser", "palette", "overlay"]

_DESCRIPTION = """\
The SemLA inference node. For each image it computes the frozen base embedding locally,
retrieves the nearest adapters from the registry's library locally (the query never leaves
this machine), downloads and verifies only those adapters, fuses them exactly per image and
segments with the class names you give.

Example:
  semla-node segment street.png --registry http://127.0.0.1:8080 \\
      --classes sky,road,sidewalk,building,vegetation,car,person,pole --out ./masks --json

For your own stack (plain peft):
  semla-node pull fog --registry URL --out ./fog            # one adapter, verified
  semla-node fuse street*.png --registry URL --out ./fused  # the fused adapter for these images
"""


def _segment(args: argparse.Namespace) -> int:
    from PIL import Image

    from semla.registry.data import read_image

    classes = parse_classes(args.classes)
    images = [read_image(p) for p in args.images]  # fail on a bad image before any download
    node = build_node(args)
    preds = node.segment(images, classes, **retrieval_options(args))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for path, image, pred in zip(args.images, images, preds):
        pred.image = str(path)
        if args.out is not None:
            Image.fromarray(pred.mask, mode="L").save(args.out / f"{path.stem}.png")
            Image.fromarray(overlay(image, pred.mask, len(classes))).save(args.out / f"{path.stem}.overlay.png")
        if args.json:
            print(json.dumps(pred.to_json()))
        else:
            top = ", ".join(f"{c.name} v{c.version} {c.weight:.2f}" for c in pred.contributions[:3])
            print(f"{path}: {top}" + (f"; base {pred.base_weight:.2f}" if args.guard else ""))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semla-node", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("segment", help="segment images with retrieved, fused adapters")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG/JPEG)")
    p.add_argument("--classes", required=True, help="comma-separated class names (any vocabulary)")
    add_retrieval_arguments(p, top_k=DEFAULT_TOP_K, temperature=DEFAULT_TEMPERATURE)
    p.add_argument("--out", type=Path, help="write DIR/<stem>.png (class indices) and DIR/<stem>.overlay.png")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    add_node_arguments(p)
    p.set_defaults(func=_segment)
    add_serve_parser(sub)
    add_explain_parser(sub)
    add_base_card_parser(sub)
    add_pull_parser(sub)
    add_fuse_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, lambda args: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
