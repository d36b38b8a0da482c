"""What every command-line edge shares: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from semla.schemas.errors import InvalidInputError, SemlaError

__all__ = [
    "run",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "add_node_arguments",
    "add_retrieval_arguments",
    "build_node",
    "parse_classes",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(parser: argparse.ArgumentParser, argv: list[str] | None, dispatch: Callable[[argparse.Namespace], int]) -> int:
    """Parse ``argv`` and call ``dispatch``; turn library errors into ``error: ...`` + exit code.

    Exit codes: 0 ok, 1 refused/failed (verification, registry refusal), 2 bad input or usage,
    130 interrupted.
    """
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs through the root logger
    args = parser.parse_args(argv)
    if not getattr(args, "command", True):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return dispatch(args)
    except SemlaError as exc:
        print(f"error: {exc.message} [{exc.code}]", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidInputError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED


# -- what every semla-node command shares ---------------------------------------------------------
def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """--registry, --device, --base, --pretrained, --cache-dir."""
    p.add_argument("--registry", required=True, help="registry URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--base", default="semla-tiny", help="base model architecture (default semla-tiny)")
    p.add_argument("--pretrained", default=None, help="base weights (see semla-client train --help)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="verified adapter cache (default ~/.cache/semla/adapters)")
    p.add_argument("--registry-key", type=Path, default=None,
                   help="the registry's public key file (hex), given out of band; default: trusted on first use")


def add_retrieval_arguments(p: argparse.ArgumentParser, *, top_k: int, temperature: float | None = None) -> None:
    """--top-k, --temperature, --distance, --weighting, --guard, --guard-z."""
    from semla.registry.retrieval import DEFAULT_DISTANCE, DISTANCES, TEMPERATURE_RANGE
    from semla.registry.weighting import WEIGHTINGS, list_weightings

    p.add_argument("--top-k", type=int, default=top_k,
                   help=f"adapters fused per image, capped at the library size (default {top_k})")
    own = ", ".join(f"{n} {WEIGHTINGS[n].default_temperature:g}" for n in list_weightings())
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"softmax temperature of the weighting, within {TEMPERATURE_RANGE} "
                        f"(default: the scheme's own: {own})")
    p.add_argument("--distance", choices=DISTANCES, default=DEFAULT_DISTANCE, help="centroid distance")
    add_weighting_arguments(p)


def add_weighting_arguments(p: argparse.ArgumentParser) -> None:
    """--weighting, --guard, --guard-z (checked by :func:`check_retrieval_arguments`)."""
    from semla.registry.weighting import DEFAULT_WEIGHTING, list_weightings

    p.add_argument("--weighting", default=DEFAULT_WEIGHTING, metavar="NAME",
                   help=f"fusion weighting scheme: {', '.join(list_weightings())} (default {DEFAULT_WEIGHTING}); "
                        "formulas in the README")
    p.add_argument("--guard", action="store_true",
                   help="give the base model (a zero adapter) weight when an image lies outside what the library "
                        "covers")
    p.add_argument("--guard-z", type=float, default=None, metavar="Z",
                   help="the base's position in spread units (with --guard; default: the library's median "
                        "99th-percentile position)")


def check_retrieval_arguments(args: argparse.Namespace) -> None:
    """The retrieval options' values, checked before any model loads.

    Raises:
        InvalidInputError: ``--top-k`` < 1, ``--temperature`` outside its range, an unknown
            ``--weighting``, or a bad ``--guard-z`` (or one given without ``--guard``).
    """
    from semla.registry.retrieval import TEMPERATURE_RANGE, temperature_ok
    from semla.registry.weighting import MAX_GUARD_Z, check_guard_z, check_weighting

    if getattr(args, "top_k", 1) < 1:
        raise InvalidInputError(f"--top-k must be >= 1, got {args.top_k}")
    if not temperature_ok(getattr(args, "temperature", None)):
        raise InvalidInputError(f"--temperature {args.temperature} is outside {TEMPERATURE_RANGE}")
    if hasattr(args, "weighting"):
        try:
            check_weighting(args.weighting)
        except InvalidInputError as exc:
            raise InvalidInputError(f"--weighting: {exc.message}", code=exc.code) from None
    guard_z = getattr(args, "guard_z", None)
    if guard_z is not None:
        try:
            check_guard_z(guard_z)
        except InvalidInputError:
            raise InvalidInputError(f"--guard-z must lie in [0, {MAX_GUARD_Z:g}], got {guard_z}") from None
        if not getattr(args, "guard", False):
            raise InvalidInputError("--guard-z needs --guard")


def retrieval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The retrieval keyword arguments of Node.segment/retrieve from parsed arguments."""
    return {"top_k": args.top_k, "temperature": args.temperature, "distance": args.distance,
            "weighting": args.weighting, "guard": args.guard, "guard_z": args.guard_z}


def parse_classes(text: str) -> list[str]:
    """Comma-separated class names.

    Raises:
        InvalidInputError: no name given.
    """
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise InvalidInputError("--classes is empty; give comma-separated class names")
    return classes


def build_node(args: argparse.Namespace, **kwargs: Any) -> Any:
    """A pulled :class:`~semla.registry.node.Node` from the arguments of :func:`add_node_arguments`.

    Raises:
        InvalidInputError: a bad retrieval option (:func:`check_retrieval_arguments`, checked before
            the model loads).
    """
    check_retrieval_arguments(args)
    from semla.registry.model import load_base
    from semla.registry.device import resolve_device
    from semla.registry.node import Node

    from semla.registry.keys import load_public_key_file, public_bytes

    device = resolve_device(args.device)
    pinned = public_bytes(load_public_key_file(args.registry_key)) if args.registry_key else None
    node = Node(args.registry, base=load_base(args.base, args.pretrained, device=device), device=str(device),
                cache_dir=args.cache_dir, registry_key=pinned, **kwargs)
    node.pull()  # unreachable with nothing cached: one-line error from the CLI runner
    return node
