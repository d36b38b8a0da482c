"""``semla-client``: the data owner's command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semla.client import audit, federate, importers
from semla.client.audit import EXIT_FLAGGED
from semla.registry.cli_common import EXIT_OK, run
from semla.registry.config import TrainConfig
from semla.registry.privacy import DEFAULT_MIN_SAMPLES
from semla.schemas.errors import InvalidInputError

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


def _synth(args: argparse.Namespace) -> int:
    from semla.registry import synth

    if args.list:
        for name in synth.list_domains():
            print(f"{name:10s} {synth.get_domain(name).description}")
        return EXIT_OK
    if args.domain is None or args.out is None:
        raise InvalidInputError("synth needs --domain and --out (or --list)")
    synth.get_domain(args.domain)
    try:
        out = synth.write_dataset(args.domain, args.n, args.seed, args.out, size=args.size, progress=True)
    except FileExistsError as exc:
        raise InvalidInputError(str(exc)) from None
    print(f"wrote {args.n} {args.domain} images to {out}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from semla.registry.data import scan_dataset

    config = TrainConfig(
        steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, batch_size=args.batch, seed=args.seed,
        version=args.version, min_samples=args.min_samples, centroids=args.centroids, domain=args.domain,
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
    )
    if args.out.exists():
        raise InvalidInputError(f"{args.out} already exists; choose a new --out")
    scan_dataset(args.data, min_samples=config.min_samples)  # bad input fails before torch and the model load

    from semla.registry.device import resolve_device
    from semla.registry.model import load_base
    from semla.registry.train import train_adapter

    device = resolve_device(args.device)
    base = load_base(args.base, args.pretrained, device=device)
    manifest = train_adapter(args.data, args.out, args.name, config, base=base, progress=True)
    dp = f", DP epsilon {manifest.privacy.epsilon:g} delta {manifest.privacy.delta:g}" if args.dp_epsilon else ""
    print(f"wrote unsigned bundle {args.out} ({manifest.name} v{manifest.version}, "
          f"{manifest.sample_count} samples, rank {manifest.rank}{dp})")
    return EXIT_OK


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semla-client", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("keygen", help="create an Ed25519 publisher key pair")
    p.add_argument("--out", type=Path, required=True, help="private key file (mode 0600); public key goes to FILE.pub")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("register", help="register your public key with a registry (admin token needed)")
    p.add_argument("--registry", required=True, help="registry URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--key", type=Path, required=True, help="your private key file (only its public half is sent)")
    p.add_argument("--token", required=True, help="the registry's admin bearer token")
    p.add_argument("--label", default="", help="a label for the key shown in listings")
    p.set_defaults(func=_register)

    p = sub.add_parser("synth", help="write a synthetic segmentation data set")
    p.add_argument("--list", action="store_true", help="list the synthetic domains and exit")
    p.add_argument("--domain", help="domain name (see --list)")
    p.add_argument("--n", type=int, default=60, help="number of images (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--out", type=Path, help="output directory (must not exist or be empty)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a LoRA adapter and write an unsigned bundle")
    p.add_argument("--data", type=Path, required=True, help="DIR with images/, masks/ and classes.txt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--name", required=True, help="adapter name: lower-case letters, digits, . _ -")
    d = TrainConfig  # the defaults, defined once (registry/config.py)
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha; scale = alpha / r (default {d.alpha:g})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--version", type=int, default=d.version,
                   help=f"adapter version, > the last published (default {d.version})")
    p.add_argument("--centroids", type=int, default=d.centroids,
                   help=f"retrieval centroids, 1 or k-means up to 8 (default {d.centroids})")
    p.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                   help=f"refuse fewer images than this (default {DEFAULT_MIN_SAMPLES})")
    p.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                   help="Gaussian DP on the centroid and sample count with this epsilon (k = 1 centroid only; "
                   "analytic Gaussian mechanism, unit-norm clipping); default: published exactly")
    p.add_argument("--dp-delta", type=float, default=d.dp_delta, metavar="D", help=f"DP delta (default {d.dp_delta:g})")
    p.add_argument("--domain", help="domain description to publish (default: from DIR/domain.json or the name)")
    p.add_argument("--base", default="semla-tiny", help="base model architecture (default semla-tiny)")
    p.add_argument("--pretrained", default=None,
                   help="base weights: default bundled for semla-tiny; an open_clip tag (openai), a path or local-dir:DIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=_train)

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

    p = sub.add_parser("rotate-key", help="hand your adapter names over to a new key (signed by the old key)")
    p.add_argument("--registry", required=True, help="registry URL")
    p.add_argument("--key", type=Path, required=True, help="the old private key")
    p.add_argument("--new-key", type=Path, required=True, help="the new private key (make it with keygen)")
    p.set_defaults(func=_rotate_key)

    importers.add_parser(sub)
    audit.add_parser(sub)
    federate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser, argv, lambda args: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
