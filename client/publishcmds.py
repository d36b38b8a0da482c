"""``semla-client sign``, ``publish`` and ``revoke``: a bundle's signature and its life at a registry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from semla.client.audit import EXIT_FLAGGED
from semla.registry.cli_common import EXIT_OK
from semla.registry.privacy import DEFAULT_MIN_SAMPLES

__all__ = ["add_parser"]


def _sign(args: argparse.Namespace) -> int:
    from semla.registry import keys
    from semla.registry.bundle import sign_bundle

    manifest = sign_bundle(args.bundle, keys.load_private_key(args.key), version=args.version,
                           min_samples=args.min_samples)
    print(f"signed {manifest.name} v{manifest.version} with key {manifest.publisher}")
    return EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    from semla.client.publish import publish_bundle
    from semla.registry import keys
    from semla.registry.http import RegistryClient

    key = keys.load_private_key(args.key) if args.key else None
    with RegistryClient(args.registry) as client:
        result = publish_bundle(args.bundle, client, key=key, dry_run=args.dry_run, min_samples=args.min_samples)
    if args.dry_run:
        print("dry run: nothing was sent. An upload would send exactly:")
        print("\n".join(result.lines()))
        return EXIT_OK if result.ok else EXIT_FLAGGED
    else:
        print(f"published {result.name} v{result.version} (publisher {result.publisher}, "
              f"manifest {result.manifest_sha256[:16]})")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    from semla.registry import keys
    from semla.registry.http import RegistryClient
    from semla.schemas import revocation_payload

    key = keys.load_private_key(args.key)
    with RegistryClient(args.registry) as client:
        revoked = client.revoke(args.name, args.version, keys.sign(key, revocation_payload(args.name, args.version)))
    print(f"revoked {revoked.name} v{revoked.version}; nodes drop it at their next pull")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add this module's commands to ``semla-client``."""
    p = sub.add_parser("sign", help="sign a bundle's manifest (writes manifest.sig)")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--key", type=Path, required=True, help="your private key file")
    p.add_argument("--version", type=int, default=None, help="set a new version before signing")
    p.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                   help=f"refuse a centroid of fewer samples (default {DEFAULT_MIN_SAMPLES})")
    p.set_defaults(func=_sign)

    p = sub.add_parser("publish", help="verify a bundle locally and upload it to a registry")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--registry", required=True, help="registry URL")
    p.add_argument("--key", type=Path, help="sign with this key first")
    p.add_argument("--dry-run", action="store_true",
                   help="print every file and field that would be sent (the audit listing) and send nothing; "
                   f"exit {EXIT_FLAGGED} when something is flagged")
    p.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                   help=f"refuse a centroid of fewer samples (default {DEFAULT_MIN_SAMPLES})")
    p.set_defaults(func=_publish)

    p = sub.add_parser("revoke", help="revoke one of your published adapter versions (signed request)")
    p.add_argument("name", help="adapter name")
    p.add_argument("version", type=int, help="version to revoke")
    p.add_argument("--registry", required=True, help="registry URL")
    p.add_argument("--key", type=Path, required=True, help="the private key that published it")
    p.set_defaults(func=_revoke)
