"""Run a registry on loopback in a child process: for demos, benchmarks and tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from semla.schemas.errors import UnavailableError

from semla.registry.net import free_port

__all__ = ["free_port", "local_registry", "serve_in_thread", "wait_healthy"]



def wait_healthy(url: str, proc: subprocess.Popen | None = None, *, timeout: float = 120.0,
                 log: Path | None = None) -> None:
    """Poll ``url/healthz`` until it answers 200.

    Raises:
        RuntimeError: ``proc`` exited, or no 200 within ``timeout`` (with the log's tail if given).
    """
    tail = lambda: f": {log.read_text()[-2000:]}" if log is not None and log.exists() else ""  # noqa: E731
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UnavailableError(f"{url} exited with {proc.returncode}{tail()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise UnavailableError(f"{url} did not answer /healthz within {timeout:g} s{tail()}")


@contextlib.contextmanager
def local_registry(data_dir: Path, admin_token: str, *, log: Path | None = None, timeout: float = 120.0,
                   exe: Path | None = None) -> Iterator[str]:
    """Start ``semla-server`` on a free 127.0.0.1 port, yield its URL, stop it afterwards.

    Args:
        log: file for the server's output (access log included); default: discarded.
        exe: the ``semla-server`` to run; default: the one beside this interpreter.

    Raises:
        RuntimeError: the server exited or did not answer ``/healthz`` within ``timeout``.
    """
    port = free_port()
    exe = exe or Path(sys.executable).with_name("semla-server")
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(exe), "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
         "--admin-token", admin_token], stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=timeout, log=log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            out.close()


@contextlib.contextmanager
def serve_in_thread(app, *, lifespan: str = "on", timeout: float = 20.0) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield its URL.

    Raises:
        RuntimeError: uvicorn did not start within ``timeout``.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise UnavailableError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
