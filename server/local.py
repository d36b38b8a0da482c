"""Run a registry on loopback in a child process: for demos, benchmarks and tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

__all__ = ["free_port", "local_registry"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_registry(data_dir: Path, admin_token: str, *, log: Path | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start ``semla-server`` on a free 127.0.0.1 port, yield its URL, stop it afterwards.

    Args:
        log: file for the server's output (access log included); default: discarded.

    Raises:
        RuntimeError: the server exited or did not answer ``/healthz`` within ``timeout``.
    """
    port = free_port()
    exe = Path(sys.executable).with_name("semla-server")
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(exe), "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
         "--admin-token", admin_token], stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the registry did not start{f'; see {log}' if log else ''}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            out.close()
