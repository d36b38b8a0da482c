"""``semla-client federate serve|join``: arguments and commands."""

from __future__ import annotations

import argparse
from pathlib import Path


from semla.client import federated as fed
from semla.registry.cli_common import EXIT_OK
from semla.schemas.errors import InvalidInputError
from semla.client.federate.run import join, serve
from semla.client.federate.tls import ServerTls


# -- command line -------------------------------------------------------------------------------------
_DESCRIPTION = """\
Train one adapter together with other owners of the same domain, without pooling images, on
Flower's Deployment Engine. Only LoRA updates, the sum of each owner's retrieval embeddings and
its image count leave an owner's machine; with --secure-aggregation the coordinator sees only
their sum (SecAgg+), with --dp-clip/--dp-noise the updates are clipped and noised (the manifest
records epsilon and delta).

Coordinator:
  semla-client federate serve --name fog --classes ./classes.txt --rounds 3 --min-clients 3 \\
      --secure-aggregation --out $PWD/fog-federated
Each owner (same classes.txt in its folder):
  semla-client federate join --superlink HOST:9092 --data ./private --root-certificates ca.pem

On real networks give the SuperLink TLS files (--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile)
and the owners the CA (--root-certificates). --insecure sends everything in plain text: use it
only on loopback or a network you trust. The result is an unsigned bundle: sign and publish it
like any other (semla-client publish BUNDLE --key KEY).
"""


#: flag, type, default, help of the training settings every owner receives from the coordinator
_TRAINING_OPTIONS = (
    ("--rank", int, fed.FederatedConfig.rank, "LoRA rank r"),
    ("--alpha", float, fed.FederatedConfig.alpha, "LoRA alpha"),
    ("--lr", float, fed.FederatedConfig.lr, "learning rate"),
    ("--batch", int, fed.FederatedConfig.batch_size, "batch size of each owner"),
    ("--seed", int, fed.FederatedConfig.seed, "seed of the shared LoRA init and of the batch order"),
    ("--version", int, fed.FederatedConfig.version, "adapter version"),
    ("--min-samples", int, fed.FederatedConfig.min_samples, "images each owner must hold"),
    ("--max-samples", int, 10_000, "most images one owner may hold (scales the secure-aggregation encoding)"),
)


def _classes(value: str) -> tuple[str, ...]:
    from semla.registry.data import read_classes

    path = Path(value)
    if path.is_file():
        return tuple(read_classes(path))
    names = tuple(c.strip() for c in value.split(",") if c.strip())
    if not names:
        raise InvalidInputError("--classes is empty; give a classes.txt file or comma-separated names")
    return names


def _serve(args: argparse.Namespace) -> int:
    from semla.client.flower_app import RunSettings

    if (args.dp_noise is not None) and args.dp_clip is None:
        raise InvalidInputError("--dp-noise needs --dp-clip (the L2 bound of each owner's update)")
    dp = None
    if args.dp_clip is not None:
        dp = fed.UpdateDP(args.dp_clip, args.dp_noise or 0.0, args.dp_delta)
    config = fed.FederatedConfig(
        rounds=args.rounds, local_steps=args.local_steps, min_clients=args.min_clients, fraction=args.fraction,
        secure_aggregation=args.secure_aggregation, dp=dp, rank=args.rank, alpha=args.alpha, lr=args.lr,
        batch_size=args.batch, seed=args.seed, version=args.version, min_samples=args.min_samples,
        domain=args.domain,
    )
    settings = RunSettings(name=args.name, out=str(args.out.resolve()), classes=_classes(args.classes), config=config,
                           base=args.base, pretrained=args.pretrained or "", max_samples=args.max_samples,
                           join_timeout=args.join_timeout)
    tls = None
    if any((args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)):
        if not all((args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)):
            raise InvalidInputError("TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
        tls = ServerTls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)

    def ready(address: str) -> None:
        flag = "--insecure" if tls is None else "--root-certificates CA.pem"
        print(f"SuperLink listening; waiting for {config.min_clients} owner(s) (up to {args.join_timeout:.0f} s).\n"
              f"Each owner runs:\n  semla-client federate join --superlink {address} --data DIR {flag}", flush=True)

    manifest = serve(settings, host=args.superlink_host, port=args.superlink_port, tls=tls, insecure=args.insecure,
                     timeout=args.timeout, on_ready=ready, echo=(lambda line: print(line, flush=True))
                     if args.verbose else None)
    fedinfo = manifest.training.federated
    assert fedinfo is not None
    print(f"wrote unsigned bundle {args.out} ({manifest.name} v{manifest.version}, {fedinfo.rounds} rounds, "
          f"{fedinfo.participants} owners, {manifest.sample_count} images, secure aggregation "
          f"{'on' if fedinfo.secure_aggregation else 'off'})")
    if fedinfo.update_privacy is not None and fedinfo.update_privacy.epsilon is not None:
        print(f"DP on the updates: epsilon {fedinfo.update_privacy.epsilon:.3g}, delta {fedinfo.update_privacy.delta:g}")
    return EXIT_OK


def _join(args: argparse.Namespace) -> int:
    print(f"joining {args.superlink} with {args.data}; Ctrl-C to leave", flush=True)
    echo = (lambda line: print(line, flush=True)) if args.verbose else None
    sent = join(args.superlink, args.data, insecure=args.insecure, root_certificates=args.root_certificates,
                require_secure_aggregation=args.require_secure_aggregation, pretrained=args.pretrained,
                min_samples=args.min_samples, timeout=args.timeout, echo=echo)
    print(f"the SuperLink at {args.superlink} has closed; this owner sent {sent} replies")
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``federate serve`` and ``federate join`` under ``semla-client``."""
    parser = subparsers.add_parser("federate", help="train one adapter with other owners (Flower, no pooled data)",
                                   description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="federate_command", metavar="{serve,join}", required=True)

    p = sub.add_parser("serve", help="coordinate a federated training (starts a SuperLink)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="adapter name: lower-case letters, digits, . _ -")
    p.add_argument("--classes", required=True, help="the vocabulary: a classes.txt file or comma-separated names "
                   "(every owner's classes.txt must list the same names in the same order)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create on this machine")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--min-clients", type=int, default=2, help="owners needed before a round starts (default 2)")
    p.add_argument("--local-steps", type=int, default=20, help="optimiser steps per owner per round (default 20)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of the connected owners asked each round, at least --min-clients; the last round "
                        "asks all (default 1)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the coordinator sees only the sum of the owners' updates")
    p.add_argument("--dp-clip", type=float, default=None, help="DP: L2 bound of each owner's update per round")
    p.add_argument("--dp-noise", type=float, default=None,
                   help="DP: noise multiplier; Gaussian noise of std dp-noise * dp-clip on the sum of updates")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP: delta of the reported (epsilon, delta)")
    for flag, kind, default, text in _TRAINING_OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--domain", help="domain description to publish (default: the name)")
    p.add_argument("--base", default="semla-tiny", help="base model architecture (default semla-tiny)")
    p.add_argument("--pretrained", default=None, help="base weights (see semla-client train --help)")
    p.add_argument("--superlink-host", default="127.0.0.1",
                   help="interface the SuperLink listens on (default 127.0.0.1; 0.0.0.0 for other machines)")
    p.add_argument("--superlink-port", type=int, default=9092, help="its port (default 9092)")
    p.add_argument("--ssl-certfile", type=Path, help="SuperLink TLS certificate (PEM)")
    p.add_argument("--ssl-keyfile", type=Path, help="SuperLink TLS private key (PEM)")
    p.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate that signed it (PEM)")
    p.add_argument("--insecure", action="store_true", help="plain text off loopback (not for untrusted networks)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for --min-clients owners to join (default 600)")
    p.add_argument("--timeout", type=float, default=None, help="seconds the whole run may take (default: no limit)")
    p.add_argument("--verbose", action="store_true", help="print the run's log")
    p.set_defaults(func=_serve)

    p = sub.add_parser("join", help="take part as a data owner (starts a SuperNode)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", required=True, help="the coordinator's address, HOST:PORT")
    p.add_argument("--data", type=Path, required=True, help="DIR with images/, masks/ and classes.txt (stays here)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain text (loopback or a trusted network only)")
    tls.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) of the SuperLink's TLS")
    p.add_argument("--require-secure-aggregation", action="store_true",
                   help="refuse any run that would send this owner's update unmasked")
    p.add_argument("--pretrained", default=None, help="where this machine keeps the base weights")
    p.add_argument("--min-samples", type=int, default=fed.privacy.DEFAULT_MIN_SAMPLES,
                   help=f"refuse to join with fewer images (default {fed.privacy.DEFAULT_MIN_SAMPLES}; "
                        "the coordinator's minimum applies anyway)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to keep trying to reach the SuperLink, at the start and after it goes away; "
                        "then leave (default 60)")
    p.add_argument("--verbose", action="store_true", help="print the SuperNode's log")
    p.set_defaults(func=_join)
