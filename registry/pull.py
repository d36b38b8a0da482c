"""``semla-node pull``: one published adapter, verified as a node verifies it, on disk.

A consumer with its own inference stack (plain peft, its own server) wants the bundle, not the
node. :func:`pull_adapter` takes the adapter from the registry's signed index (so it must be
listed, not revoked, and made for this base model), downloads its four files and runs the
node's own verification on them (:meth:`Node.verified_files`: publisher signature by a key of
the signed index, every file hash, the manifest against the listing, the safetensors header,
the base fingerprint, shapes and embedding space). Only then is the folder written, whole
(temp dir beside it, then rename). The folder is a standard peft adapter::

    import peft
    from semla.registry.model import load_base

    base = load_base()                                      # semla-tiny
    peft.PeftModel.from_pretrained(base.clip, "./fog")      # LoRA now in base.clip
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semla.registry.cli_common import EXIT_OK, add_node_arguments, build_node
from semla.registry._outdir import check_out_dir, write_out_dir
from semla.schemas import BUNDLE_FILES, AdapterSummary
from semla.schemas.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from semla.registry.node import Node

__all__ = ["parse_ref", "find_adapter", "pull_adapter", "add_parser"]

_REF = re.compile(r"^(?P<name>[^@\s]+)(?:@(?P<version>[0-9]{1,9}))?$")


def parse_ref(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` → (name, version or None for the latest).

    Raises:
        InvalidInputError: anything else.
    """
    match = _REF.match(text.strip())
    if match is None:
        raise InvalidInputError(f"{text!r} is not NAME or NAME@VERSION (e.g. fog or fog@2)")
    version = match["version"]
    return match["name"], int(version) if version is not None else None


def find_adapter(library: Sequence[AdapterSummary], name: str, version: int | None = None) -> AdapterSummary:
    """The listed adapter ``name`` at ``version`` (None: its highest listed version).

    Raises:
        NotFoundError: no such name or version in the signed index for this base.
    """
    matches = [a for a in library if a.name == name]
    if not matches:
        names = ", ".join(sorted({a.name for a in library})) or "none"
        raise NotFoundError(f"adapter {name!r} is not in the registry's signed index for this base; have: {names}")
    if version is None:
        return max(matches, key=lambda a: a.version)
    for a in matches:
        if a.version == version:
            return a
    have = ", ".join(str(a.version) for a in sorted(matches, key=lambda a: a.version))
    raise NotFoundError(f"adapter {name!r} has no version {version} in the signed index; listed: {have}")


def pull_adapter(node: "Node", ref: str, out: Path, *, force: bool = False) -> AdapterSummary:
    """Download ``NAME[@VERSION]``, verify it as the node does, write the bundle folder ``out``.

    Args:
        node: a node bound to the registry and the base model the adapter must fit.
        force: replace an existing folder of bundle files at ``out``.

    Returns:
        The index entry that was written.

    Raises:
        InvalidInputError: a bad reference, or ``out`` cannot be written (checked first).
        NotFoundError: not listed for this base.
        VerificationError, IncompatibleAdapterError: the bundle failed verification; nothing
            is written.
    """
    name, version = parse_ref(ref)
    check_out_dir(out, force=force, replaceable=BUNDLE_FILES)
    if not node.library:
        node.pull()
    summary = find_adapter(node.library, name, version)
    files = node.verified_files(summary)
    write_out_dir(out, files, force=force)
    return summary


def _pull_command(args: argparse.Namespace) -> int:
    parse_ref(args.adapter)  # a bad reference fails before the base model loads
    check_out_dir(args.out, force=args.force, replaceable=BUNDLE_FILES)
    node = build_node(args)
    summary = pull_adapter(node, args.adapter, args.out, force=args.force)
    print(f"pulled {summary.name} v{summary.version} (publisher {summary.publisher}, "
          f"manifest {summary.manifest_sha256[:16]}) to {args.out}: verified")
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``semla-node pull`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "pull", help="download one adapter, verified as a node verifies it, as a peft folder",
        description="Download NAME[@VERSION] (default: its latest listed version) from the registry's signed "
                    "index and verify it exactly as a node does before use: publisher signature, every file "
                    "hash, the manifest against the signed listing, the safetensors header, the base model "
                    "fingerprint and shapes. DIR is written only when all of that passes (never half-written); "
                    "it loads with peft.PeftModel.from_pretrained on the base model.")
    p.add_argument("adapter", metavar="NAME[@VERSION]", help="adapter name, optionally @version")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds only bundle files")
    add_node_arguments(p)
    p.set_defaults(func=_pull_command)
    return p
