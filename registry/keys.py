"""Publisher and registry keys: Ed25519, key id = hex(sha256(raw public key))[:16]."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from semla.schemas.errors import InvalidInputError, SignatureError

__all__ = [
    "generate_key",
    "key_id",
    "public_bytes",
    "save_keypair",
    "load_private_key",
    "load_public_key_file",
    "public_key_from_hex",
    "sign",
    "verify",
    "load_or_create_key",
]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    raw = key if isinstance(key, bytes) else public_bytes(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_keypair(key: Ed25519PrivateKey, path: Path) -> tuple[Path, Path]:
    """Write the private key (PKCS#8 PEM, mode 0600) at ``path`` and the public key at ``path.pub``.

    Raises:
        InvalidInputError: either file already exists (keys are never overwritten).
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise InvalidInputError(f"{p} already exists; refusing to overwrite a key")
    if not path.parent.is_dir():
        raise InvalidInputError(f"directory {path.parent} does not exist")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)
    pub_path.write_text(public_bytes(key).hex() + "\n")
    return path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key written by :func:`save_keypair`.

    Raises:
        InvalidInputError: missing, unreadable or not an Ed25519 private key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InvalidInputError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a raw Ed25519 public key given as 64 hex characters.

    Raises:
        InvalidInputError: not 32 bytes of hex.
    """
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidInputError("public key is not hex") from None
    if len(raw) != 32:
        raise InvalidInputError(f"public key must be 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        return public_key_from_hex(path.read_text())
    except OSError as exc:
        raise InvalidInputError(f"cannot read public key file {path}: {exc.strerror}") from None


def sign(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    return key.sign(payload)


def verify(public_key: Ed25519PublicKey | bytes, signature: bytes, payload: bytes, *, what: str) -> None:
    """Check an Ed25519 signature over ``payload``.

    Args:
        what: what was signed ("the manifest", "the revoke request", ...), named in the error.

    Raises:
        SignatureError: the signature is malformed or does not match.
    """
    pub = Ed25519PublicKey.from_public_bytes(public_key) if isinstance(public_key, bytes) else public_key
    if len(signature) != 64:
        raise SignatureError(f"the signature of {what} must be 64 bytes, got {len(signature)}")
    try:
        pub.verify(signature, payload)
    except InvalidSignature:
        raise SignatureError(f"signature does not match {what}") from None


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, created (0600, with ``path.pub``) when absent.

    Several processes may race to create it (registry replicas sharing a data dir): the first
    one wins and the others load its key.
    """
    path = Path(path)
    if not path.exists():
        try:
            save_keypair(generate_key(), path)
        except InvalidInputError:
            pass  # another process created it first
    return load_private_key(path)
