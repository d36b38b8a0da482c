"""Running a federation: the SuperLink side (:func:`serve`), an owner's SuperNode (:func:`join`), and
both on loopback (:func:`run_loopback`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from semla.registry.net import free_port
from semla.schemas import Manifest
from semla.schemas.errors import InvalidInputError, SemlaError
from semla.client.federate.appgen import check_settings, write_app
from semla.client.federate.processes import Child, flower_env, reachable, split_address, stop_all, tail, wait_listening
from semla.client.federate.tls import LOOPBACK, ServerTls, write_connection

if TYPE_CHECKING:
    from semla.client.flower_app import RunSettings


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
    check_settings(settings)
    if tls is None and not insecure and host not in LOOPBACK:
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
        link = Child(args, flower_env(work / "superlink"), work / "superlink.log")
        try:
            wait_listening(link, host, port)
            public = socket.getfqdn() if host in ("0.0.0.0", "::") else host
            # flwr run dials the name the certificate carries; in plain text, loopback will do
            dial = public if tls is not None else "127.0.0.1" if host in ("0.0.0.0", "::") else host
            if on_ready is not None:
                on_ready(f"{public}:{port}")
            write_app(work / "app", settings)
            write_connection(work / "cli", f"{dial}:{port}", root_certificates=tls.ca_certfile if tls else None)
            _run_app(work, link, timeout=timeout, echo=echo)
        finally:
            link.stop()
        out = Path(settings.out)
        if not (out / "manifest.json").is_file():
            raise SemlaError(f"the federated run ended without writing {out}:\n{tail(work / 'run.log')}",
                             code="federation_failed")
        return Manifest.parse((out / "manifest.json").read_bytes())


def _run_app(work: Path, link: Child, *, timeout: float | None, echo: Callable[[str], None] | None) -> None:
    """``flwr run APP semla --stream``: returns when the run has finished (its log stream ends)."""
    log = work / "run.log"
    child = Child(["flwr", "run", str(work / "app"), "semla", "--stream"], flower_env(work / "cli"), log)
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
                raise SemlaError(f"the federated run took longer than {timeout:.0f} s; stopped:\n{tail(log)}",
                                 code="federation_failed")
            time.sleep(0.2)
    finally:
        child.stop()
        stop.set()
        reader.join(5)
    if child.proc.returncode != 0:
        raise SemlaError(f"flwr run failed (exit {child.proc.returncode}):\n{tail(log)}", code="federation_failed")


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
    host, port = split_address(superlink)
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise InvalidInputError(f"root certificates {root_certificates} do not exist")
    deadline = time.monotonic() + timeout
    while not reachable(host, port):
        if time.monotonic() > deadline:
            raise SemlaError(f"the SuperLink at {superlink} cannot be reached (tried for {timeout:.0f} s)",
                             code="superlink_unreachable")
        time.sleep(0.5)
    with tempfile.TemporaryDirectory(prefix="semla-supernode-") as tmp:
        args = supernode_command(superlink, data, insecure=insecure, root_certificates=root_certificates,
                                 require_secure_aggregation=require_secure_aggregation, pretrained=pretrained,
                                 max_wait=timeout)
        node = Child(args, flower_env(Path(tmp) / "home"), Path(tmp) / "supernode.log")
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
def _supernodes(superlink: str, owner_dirs: Sequence[Path], work: Path, threads: int) -> Iterator[list[Child]]:
    nodes: list[Child] = []
    try:
        for i, data in enumerate(owner_dirs):
            env = flower_env(work / f"owner{i}", OMP_NUM_THREADS=str(threads))
            nodes.append(Child(supernode_command(superlink, data, insecure=True, max_wait=30.0), env,
                                work / f"owner{i}.log"))
        yield nodes
    finally:
        stop_all(nodes)


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
