"""``semla-client federate``: federated training on Flower's Deployment Engine (DESIGN §7).

The coordinator runs ``federate serve``: it starts a ``flower-superlink``, prints the address
owners join, submits the Flower app (:mod:`semla.client.flower_app`) with ``flwr run``, waits
for the run, and finds the unsigned bundle the ServerApp wrote; the SuperLink is shut down
whatever happens (success, failure, Ctrl-C, time limit). Each owner runs ``federate join``,
which starts a ``flower-supernode`` whose node config points at the owner's private folder.

Transport security: on real networks the SuperLink serves TLS. ``serve`` passes
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` through to ``flower-superlink`` (the
certificate must name the host owners dial), owners pass the CA as ``join --root-certificates``
(``flower-supernode --root-certificates``). Plain text (``--insecure``) is used only on
loopback, or when asked for explicitly. Secure aggregation is separate: it hides each owner's
update from the coordinator itself, TLS hides everything from the network.

Flower 1.42 serves every API of the SuperLink on one HTTP port (``--host``/``--port``; the
default 127.0.0.1:8000 is never relied on) and starts ``flower-superexec`` by name, so the
children run with this interpreter's ``bin/`` first on PATH and a private ``FLWR_HOME``.
Telemetry, update checks and runtime dependency installation (``uv sync``) are switched off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from semla.client import federated as fed
from semla.registry.cli_common import EXIT_OK
from semla.registry.net import free_port
from semla.schemas import Manifest
from semla.schemas.errors import InvalidInputError, SemlaError

if TYPE_CHECKING:
    from semla.client.flower_app import RunSettings

__all__ = ["ServerTls", "add_parser", "flower_env", "join", "run_loopback", "serve", "supernode_command"]

APP_REF = "semla.client.flower_app"
_OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files (PEM), passed through to ``flower-superlink``."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    def __post_init__(self) -> None:
        for what, path in (("certificate", self.certfile), ("key", self.keyfile), ("CA certificate", self.ca_certfile)):
            if not Path(path).is_file():
                raise InvalidInputError(f"TLS {what} {path} does not exist")


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of a Flower child process: this venv's bin/ first on PATH, a private
    FLWR_HOME, no telemetry, no update check, no runtime ``uv sync``."""
    env = {**os.environ, **_OFFLINE, "FLWR_HOME": str(home), **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _split_address(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?(?P<host>[^\]]+?)\]?:(?P<port>\d{1,5})", address.strip())
    if match is None:
        raise InvalidInputError(f"bad address {address!r}; expected HOST:PORT")
    return match["host"], int(match["port"])


class _Child:
    """A Flower process this module started, with its output in a log file; :meth:`stop` ends it
    and every process it started, by process id."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def terminate(self) -> None:
        """Ask this process and every process it started to stop (SIGTERM, by process id)."""
        import psutil

        try:  # zombies are already gone: their parent reaps them, or init does once it exits
            self._descendants = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                                 if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            self._descendants = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        for p in self._descendants:  # they would follow their parent out, but take seconds to notice
            with contextlib.suppress(psutil.Error):
                p.terminate()

    def wait(self, grace: float = 10.0) -> None:
        """Wait for the process and its descendants to end; kill what is left after ``grace`` s."""
        import psutil

        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(getattr(self, "_descendants", []), timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self._out.close()

    def stop(self, grace: float = 10.0) -> None:
        self.terminate()
        self.wait(grace)


def _stop_all(children: Sequence[_Child]) -> None:
    """Stop several children at once (each takes a few seconds to wind down)."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait()


def _wait_listening(child: _Child, host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise SemlaError(f"flower-superlink exited with code {child.proc.returncode}:\n{child.tail()}",
                             code="federation_failed")
        if _reachable("127.0.0.1" if host in ("0.0.0.0", "::") else host, port):
            return
        time.sleep(0.2)
    raise SemlaError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f} s", code="federation_failed")


def _write_app(app_dir: Path, settings: RunSettings) -> None:
    """The Flower app directory ``flwr run`` packs: a pyproject naming the components by import path."""
    import tomli_w

    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "semla-federated", "version": "1.0.0", "description": "SemLA federated LoRA training",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "semla",
            "components": {"serverapp": f"{APP_REF}:server_app", "clientapp": f"{APP_REF}:client_app"},
            "config": settings.to_run_config(),
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


def _write_connection(home: Path, address: str, *, root_certificates: Path | None) -> None:
    """The ``flwr`` CLI's connection to the SuperLink, in ``FLWR_HOME/config.toml``."""
    import tomli_w

    conn: dict[str, object] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "semla", "semla": conn}}))


def _check_settings(settings: RunSettings) -> None:
    out = Path(settings.out)
    if not out.is_absolute():
        raise InvalidInputError(f"the output path {out} must be absolute (the ServerApp runs elsewhere)")
    if out.exists():
        raise InvalidInputError(f"{out} already exists; choose a new --out")
    if not out.parent.is_dir():
        raise InvalidInputError(f"{out.parent} does not exist")
    if not settings.classes or any(not c.strip() or "\n" in c for c in settings.classes):
        raise InvalidInputError("the class list is empty or holds an empty name")


def serve(
    settings: RunSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 9092,
    tls: ServerTls | None = None,
    insecure: bool = False,
    timeout: float | None = None,
    on_ready: Callable[[str], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> Manifest:
    """Coordinate one federated training: SuperLink up, ``flwr run``, wait, bundle, SuperLink down.

    Args:
        host / port: where the SuperLink listens (all its APIs, one port).
        tls: TLS files; without them the SuperLink runs in plain text, which is allowed on a
            loopback ``host`` or with ``insecure=True``.
        timeout: seconds the whole run may take (None: no limit beyond the run's join timeout).
        on_ready: called with the address owners join, once the SuperLink listens.
        echo: receives each line of the run's log (default: discarded).

    Returns:
        The manifest of the unsigned bundle written at ``settings.out``.

    Raises:
        InvalidInputError: bad settings, an existing ``out``, plain text off loopback unasked.
        SemlaError: the SuperLink did not start, or the run failed or ran out of time
            (code ``federation_failed``; the message ends with the run's last log lines).
    """
    _check_settings(settings)
    if tls is None and not insecure and host not in _LOOPBACK:
        raise InvalidInputError(f"a SuperLink reachable on {host} needs TLS (--ssl-certfile, --ssl-keyfile, "
                                "--ssl-ca-certfile), or --insecure to run in plain text anyway")
    with tempfile.TemporaryDirectory(prefix="semla-federate-") as tmp:
        work = Path(tmp)
        args = ["flower-superlink", "--host", host, "--port", str(port)]
        if tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile),
                     "--ssl-ca-certfile", str(tls.ca_certfile)]
        link = _Child(args, flower_env(work / "superlink"), work / "superlink.log")
        try:
            _wait_listening(link, host, port)
            public = socket.getfqdn() if host in ("0.0.0.0", "::") else host
            # flwr run dials the name the certificate carries; in plain text, loopback will do
            dial = public if tls is not None else "127.0.0.1" if host in ("0.0.0.0", "::") else host
            if on_ready is not None:
                on_ready(f"{public}:{port}")
            _write_app(work / "app", settings)
            _write_connection(work / "cli", f"{dial}:{port}", root_certificates=tls.ca_certfile if tls else None)
            _run_app(work, link, timeout=timeout, echo=echo)
        finally:
            link.stop()
        out = Path(settings.out)
        if not (out / "manifest.json").is_file():
            raise SemlaError(f"the federated run ended without writing {out}:\n{_tail(work / 'run.log')}",
                             code="federation_failed")
        return Manifest.parse((out / "manifest.json").read_bytes())


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def _run_app(work: Path, link: _Child, *, timeout: float | None, echo: Callable[[str], None] | None) -> None:
    """``flwr run APP semla --stream``: returns when the run has finished (its log stream ends)."""
    log = work / "run.log"
    child = _Child(["flwr", "run", str(work / "app"), "semla", "--stream"], flower_env(work / "cli"), log)
    stop = threading.Event()

    def follow() -> None:  # echo the run's log while it streams
        with open(log, "rb") as f:
            while True:
                line = f.readline()
                if line:
                    if echo is not None:
                        echo(line.decode(errors="replace").rstrip("\n"))
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while child.proc.poll() is None:
            if link.proc.poll() is not None:
                raise SemlaError(f"flower-superlink exited during the run:\n{link.tail()}", code="federation_failed")
            if deadline is not None and time.monotonic() > deadline:
                raise SemlaError(f"the federated run took longer than {timeout:.0f} s; stopped:\n{_tail(log)}",
                                 code="federation_failed")
            time.sleep(0.2)
    finally:
        child.stop()
        stop.set()
        reader.join(5)
    if child.proc.returncode != 0:
        raise SemlaError(f"flwr run failed (exit {child.proc.returncode}):\n{_tail(log)}", code="federation_failed")


def supernode_command(
    superlink: str,
    data: Path,
    *,
    insecure: bool = False,
    root_certificates: Path | None = None,
    runtime_port: int | None = None,
    require_secure_aggregation: bool = False,
    pretrained: str | None = None,
    max_wait: float = 60.0,
) -> list[str]:
    """The ``flower-supernode`` command line of one owner (node config: its data folder)."""
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    node_config = [f"data={quote(str(Path(data).resolve()))}"]
    if require_secure_aggregation:
        node_config.append("require-secure-aggregation=true")
    if pretrained:
        node_config.append(f"pretrained={quote(pretrained)}")
    args = ["flower-supernode", "--superlink", superlink, "--node-config", " ".join(node_config),
            "--port", str(runtime_port or free_port()), "--max-wait-time", str(max_wait)]
    if insecure:
        args.append("--insecure")
    elif root_certificates is not None:
        args += ["--root-certificates", str(root_certificates)]
    return args


def _check_owner(data: Path, min_samples: int = 1) -> None:
    from semla.registry.data import load_dataset

    load_dataset(Path(data), min_samples=min_samples)  # one-line error on a bad folder, before any network


def join(
    superlink: str,
    data: Path,
    *,
    insecure: bool = False,
    root_certificates: Path | None = None,
    require_secure_aggregation: bool = False,
    pretrained: str | None = None,
    min_samples: int = 1,
    timeout: float = 60.0,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Serve as one owner: check the folder, reach the SuperLink, run a SuperNode until the
    SuperLink has been gone for ``timeout`` s (the coordinator ended the federation) or until
    interrupted.

    Returns:
        How many replies this owner sent (a SecAgg+ round takes four).

    Raises:
        InvalidInputError: a bad data folder or fewer than ``min_samples`` images, a bad address,
            missing root certificates.
        SemlaError: the SuperLink cannot be reached within ``timeout`` s (``superlink_unreachable``),
            or the SuperNode stopped with an error.
    """
    _check_owner(data, min_samples)
    host, port = _split_address(superlink)
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise InvalidInputError(f"root certificates {root_certificates} do not exist")
    deadline = time.monotonic() + timeout
    while not _reachable(host, port):
        if time.monotonic() > deadline:
            raise SemlaError(f"the SuperLink at {superlink} cannot be reached (tried for {timeout:.0f} s)",
                             code="superlink_unreachable")
        time.sleep(0.5)
    with tempfile.TemporaryDirectory(prefix="semla-supernode-") as tmp:
        args = supernode_command(superlink, data, insecure=insecure, root_certificates=root_certificates,
                                 require_secure_aggregation=require_secure_aggregation, pretrained=pretrained,
                                 max_wait=timeout)
        node = _Child(args, flower_env(Path(tmp) / "home"), Path(tmp) / "supernode.log")
        connected, sent, gone = False, 0, False
        try:
            with open(node.log, "rb") as f:
                while node.proc.poll() is None and not gone:
                    line = f.readline().decode(errors="replace").rstrip("\n")
                    if not line:
                        time.sleep(0.2)
                        continue
                    if echo is not None:
                        echo(line)
                    connected = connected or "SuperNode ID" in line
                    sent += "Sent successfully" in line
                    gone = "Giving up reconnection" in line  # the SuperNode would linger on regardless
        finally:
            node.stop()
        if connected and (gone or node.proc.returncode in (0, -signal.SIGTERM)):
            return sent
        raise SemlaError(f"flower-supernode stopped (exit {node.proc.returncode}):\n{node.tail()}",
                         code="federation_failed" if connected else "superlink_unreachable")


@contextlib.contextmanager
def _supernodes(superlink: str, owner_dirs: Sequence[Path], work: Path, threads: int) -> Iterator[list[_Child]]:
    nodes: list[_Child] = []
    try:
        for i, data in enumerate(owner_dirs):
            env = flower_env(work / f"owner{i}", OMP_NUM_THREADS=str(threads))
            nodes.append(_Child(supernode_command(superlink, data, insecure=True, max_wait=30.0), env,
                                work / f"owner{i}.log"))
        yield nodes
    finally:
        _stop_all(nodes)


def run_loopback(
    owner_dirs: Sequence[Path],
    settings: RunSettings,
    *,
    timeout: float | None = 900.0,
    echo: Callable[[str], None] | None = None,
) -> Manifest:
    """One whole federated training on this machine through Flower's Deployment Engine: a
    SuperLink on a free loopback port, one SuperNode per owner folder, ``flwr run``.

    Every process is stopped before this returns or raises.
    """
    for data in owner_dirs:
        _check_owner(data, settings.config.min_samples)
    threads = max(1, (os.cpu_count() or 1) // max(1, len(owner_dirs)))
    with tempfile.TemporaryDirectory(prefix="semla-loopback-") as tmp, contextlib.ExitStack() as stack:
        def start_owners(address: str) -> None:
            stack.enter_context(_supernodes(address, owner_dirs, Path(tmp), threads))

        return serve(settings, host="127.0.0.1", port=free_port(), timeout=timeout, on_ready=start_owners, echo=echo)


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
