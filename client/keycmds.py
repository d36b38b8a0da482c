"""``semla-client keygen``, ``register`` and ``rotate-key``: a publisher's key and its standing at a registry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from semla.registry.cli_common import EXIT_OK

__all__ = ["add_parser"]


def _keygen(args: argparse.Namespace) -> int:
    from semla.registry import keys

    key = keys.generate_key()
    priv, pub = keys.save_keypair(key, args.out)
    print(f"key id {keys.key_id(key)}\nprivate key {priv} (mode 0600, never uploaded)\npublic key {pub}")
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    from semla.registry import keys
    from semla.registry.http import RegistryClient

    key = keys.load_private_key(args.key)
    with RegistryClient(args.registry) as client:
        info = client.register_key(keys.public_bytes(key).hex(), args.token, label=args.label)
    print(f"registered key {info.key_id}")
    return EXIT_OK


def _rotate_key(args: argparse.Namespace) -> int:
    from semla.registry import keys
    from semla.registry.http import RegistryClient
    from semla.schemas import rotation_payload

    old, new = keys.load_private_key(args.key), keys.load_private_key(args.new_key)
    new_hex = keys.public_bytes(new).hex()
    with RegistryClient(args.registry) as client:
        info = client.rotate_key(keys.key_id(old), new_hex, keys.sign(old, rotation_payload(keys.key_id(old), new_hex)))
    print(f"rotated {keys.key_id(old)} to {info.key_id}: publish with the new key from now on")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add this module's commands to ``semla-client``."""
    p = sub.add_parser("keygen", help="create an Ed25519 publisher key pair")
    p.add_argument("--out", type=Path, required=True, help="private key file (mode 0600); public key goes to FILE.pub")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("register", help="register your public key with a registry (admin token needed)")
    p.add_argument("--registry", required=True, help="registry URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--key", type=Path, required=True, help="your private key file (only its public half is sent)")
    p.add_argument("--token", required=True, help="the registry's admin bearer token")
    p.add_argument("--label", default="", help="a label for the key shown in listings")
    p.set_defaults(func=_register)

    p = sub.add_parser("rotate-key", help="hand your adapter names over to a new key (signed by the old key)")
    p.add_argument("--registry", required=True, help="registry URL")
    p.add_argument("--key", type=Path, required=True, help="the old private key")
    p.add_argument("--new-key", type=Path, required=True, help="the new private key (make it with keygen)")
    p.set_defaults(func=_rotate_key)
