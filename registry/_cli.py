"""What every command-line edge shares: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from semla.schemas.errors import InvalidInputError, SemlaError

__all__ = ["run", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

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
