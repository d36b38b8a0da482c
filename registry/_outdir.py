"""Writing a command's output folder whole or not at all (torch-free).

``semla-node pull`` and ``semla-node fuse`` write a folder of a few known files. The files go
into a temp dir beside the target and are renamed into place, so a failure leaves nothing
half-written. An existing non-empty target is refused; with ``force`` it is replaced, but
only when it holds nothing except files of the kind the command writes: ``--force`` never
deletes anything else.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from semla.registry.fs import atomic_replace_dir
from semla.schemas.errors import InvalidInputError

__all__ = ["check_out_dir", "write_out_dir"]


def check_out_dir(out: Path, *, force: bool, replaceable: Collection[str]) -> None:
    """Refuse ``out`` before any work is done when it could not be written.

    Raises:
        InvalidInputError: ``out`` is a file; or a non-empty folder without ``force``; or, with
            ``force``, a folder holding anything but the names in ``replaceable``.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        raise InvalidInputError(f"{out} is not empty; choose a new --out or pass --force to replace it")
    foreign = [e for e in entries if e not in replaceable or not (out / e).is_file() or (out / e).is_symlink()]
    if foreign:
        raise InvalidInputError(f"{out} holds {foreign[0]!r}, which this command did not write; "
                                "--force only replaces a folder of its own files")


def write_out_dir(out: Path, files: Mapping[str, bytes], *, force: bool) -> None:
    """Check ``out`` again and write ``files`` there atomically (temp dir beside it, then rename)."""
    check_out_dir(out, force=force, replaceable=files)
    atomic_replace_dir(Path(out), files, overwrite=True)
