"""Content-addressed blob store on the filesystem: ``<root>/sha256/ab/<hex>``.

Every blob is written to a temp file in its final directory, fsynced, renamed into place and
the directory fsynced, so a blob that exists under its name is complete and durable; the
registry commits a database row only after that. A blob already present is not rewritten, so
identical files (e.g. the same adapter_config.json in many adapters) are stored once.

Paths are only ever built from a validated sha256 hex digest, never from user strings.
Several server replicas may share one store: writes are atomic renames of identical content.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from semla.registry.fs import fsync_dir
from semla.registry.bundle import sha256_bytes
from semla.schemas.errors import InvalidInputError

__all__ = ["BlobStore"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """Blobs under ``root/sha256``.

    Args:
        root: The store's directory (created when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._base = self.root / "sha256"
        self._base.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists).

        Raises:
            InvalidInputError: ``sha256`` is not 64 lower-case hex characters.
        """
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise InvalidInputError("blob address must be 64 lower-case hex characters")
        return self._base / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably (once) and return its sha256 hex digest."""
        digest = sha256_bytes(data)
        target = self.path(digest)
        if target.is_file():
            return digest
        shard = target.parent
        if not shard.is_dir():
            shard.mkdir(parents=True, exist_ok=True)
            fsync_dir(self._base)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=shard)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(shard)
        return digest

    def files(self) -> list[tuple[Path, str | None]]:
        """Every file in the store: (path, digest), digest None for a leftover temp file."""
        out = []
        for path in self._base.glob("*/*"):
            if path.is_file():
                out.append((path, path.name if _HEX64.fullmatch(path.name) else None))
        return out

    def get(self, sha256: str) -> bytes:
        """The blob's bytes.

        Raises:
            FileNotFoundError: no such blob.
        """
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        """Remove a blob (no error when it is already gone)."""
        target = self.path(sha256)
        try:
            target.unlink()
        except FileNotFoundError:
            return
        fsync_dir(target.parent)
