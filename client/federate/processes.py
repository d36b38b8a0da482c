"""The Flower processes this package starts: their environment, logs, readiness and shutdown."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


from semla.schemas.errors import InvalidInputError, SemlaError


OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of a Flower child process: this venv's bin/ first on PATH, a private
    FLWR_HOME, no telemetry, no update check, no runtime ``uv sync``."""
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(home), **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?(?P<host>[^\]]+?)\]?:(?P<port>\d{1,5})", address.strip())
    if match is None:
        raise InvalidInputError(f"bad address {address!r}; expected HOST:PORT")
    return match["host"], int(match["port"])


class Child:
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


def stop_all(children: Sequence[Child]) -> None:
    """Stop several children at once (each takes a few seconds to wind down)."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait()


def wait_listening(child: Child, host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise SemlaError(f"flower-superlink exited with code {child.proc.returncode}:\n{child.tail()}",
                             code="federation_failed")
        if reachable("127.0.0.1" if host in ("0.0.0.0", "::") else host, port):
            return
        time.sleep(0.2)
    raise SemlaError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f} s", code="federation_failed")


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""
