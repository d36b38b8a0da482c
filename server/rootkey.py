"""The registry's own signing key and its rotations (after TUF's root rotation).

The key signs every index snapshot. Rotating it writes a statement signed by the old key
naming the new one; the chain of statements is served with every snapshot, so a node pinned to
any earlier key follows it to the current key and pins that instead. Replicas sharing a data
dir pick up a rotated key when they restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from semla.registry import keys as _keys
from semla.registry.fs import fsync_dir, write_durable
from semla.schemas import RootRotation, canonical_json, root_rotation_payload

__all__ = ["load_rotations", "rotate_registry_key", "rotations_path"]


def rotations_path(key_file: Path) -> Path:
    return Path(key_file).with_name(Path(key_file).name + ".rotations.json")


def load_rotations(key_file: Path) -> list[RootRotation]:
    """Every rotation of the key at ``key_file``, oldest first (none when never rotated)."""
    path = rotations_path(key_file)
    if not path.exists():
        return []
    return [RootRotation.model_validate(r) for r in json.loads(path.read_text())]


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    write_durable(tmp, pem)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def rotate_registry_key(key_file: Path) -> RootRotation:
    """Replace the registry key with a new one, signed over by the old one.

    The old private key is kept beside it as ``<key_file>.<old key id>``; the statement is
    appended to ``<key_file>.rotations.json`` before the new key is installed.
    """
    key_file = Path(key_file)
    old = _keys.load_private_key(key_file)
    new = _keys.generate_key()
    new_hex = _keys.public_bytes(new).hex()
    old_id = _keys.key_id(old)
    rotation = RootRotation(old_key_id=old_id, new_public_key=new_hex,
                            signature=_keys.sign(old, root_rotation_payload(old_id, new_hex)).hex())
    chain = [r.model_dump() for r in load_rotations(key_file)] + [rotation.model_dump()]
    path = rotations_path(key_file)
    write_durable(path.with_name(path.name + ".tmp"), canonical_json(chain))
    os.replace(path.with_name(path.name + ".tmp"), path)
    _write_private(key_file.with_name(f"{key_file.name}.{old_id}"), old)
    _write_private(key_file, new)
    Path(str(key_file) + ".pub").write_text(new_hex + "\n")
    fsync_dir(key_file.parent)
    return rotation
