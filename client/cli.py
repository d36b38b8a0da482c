"""``semla-client``: the data owner's command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import sys

from semla.client import audit, federate, importers, keycmds, publishcmds, traincmds
from semla.registry.cli_common import run

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
The SemLA data owner's kit. Train a LoRA adapter on private images, sign it, and publish only
the adapter weights, its config, the CLIP centroid and metadata to a registry.

Typical flow:
  semla-client keygen --out owner.key
  semla-client register --registry URL --key owner.key --token ADMIN_TOKEN
  semla-client synth --domain fog --n 60 --seed 1 --out ./private
      (or your own data: semla-client import cityscapes ROOT --split train --out ./private)
  semla-client train --data ./private --out ./fog-bundle --name fog [--dp-epsilon 4]
  semla-client audit ./fog-bundle          # every byte a publish would send; flags what should not
  semla-client publish ./fog-bundle --registry URL --key owner.key
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semla-client", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    keycmds.add_parser(sub)
    traincmds.add_parser(sub)
    publishcmds.add_parser(sub)
    importers.add_parser(sub)
    audit.add_parser(sub)
    federate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser, argv, lambda args: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
