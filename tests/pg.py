"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests (plain module: ``import pg``).

Uses the server binaries of the machine (``/usr/lib/postgresql/*/bin``, or ``initdb`` on
PATH); nothing is installed here. ``initdb`` refuses to run as root, so when the tests run as
root (CI) every PostgreSQL command runs as the ``postgres`` system user via
``runuser -u postgres --`` on a temporary directory chowned to it. The cluster trusts local
connections (it listens on loopback only, on a free port, with its socket in its own
directory), uses ``fsync=off`` (throwaway data) and is stopped and deleted on exit. Every
subprocess is bounded by a timeout.

Typical use::

    reason = pg.unavailable_reason()
    if reason: pytest.skip(reason)
    with pg.cluster() as c:
        url = c.create_database("registry")   # postgresql+psycopg://postgres@127.0.0.1:PORT/registry
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semla.registry.net import free_port

__all__ = ["Cluster", "cluster", "find_bindir", "unavailable_reason"]

#: Seconds any one PostgreSQL command may take.
COMMAND_TIMEOUT = 60
SUPERUSER = "postgres"


def _version_key(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([\d.]+)/bin", bindir)
    return tuple(int(p) for p in match.group(1).split(".") if p) if match else (0,)


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` holding initdb and pg_ctl, else PATH's."""
    candidates = sorted(
        (str(Path(p).parent) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")), key=_version_key, reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for bindir in candidates:
        if all(os.access(Path(bindir) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(bindir)
    return None


def _run_as() -> list[str]:
    """Command prefix: ``runuser -u postgres --`` when root (initdb refuses root), else nothing."""
    return ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (a skip reason), or None when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if find_bindir() is None:
        return "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (initdb refuses to run as root)"
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return f"running as root and there is no {SUPERUSER!r} system user to run initdb as"
    return None


def _chown_tree(root: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for path in [root, *root.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


@dataclass
class Cluster:
    """A running throwaway cluster."""

    bindir: Path
    root: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL of one database (psycopg 3 driver, trust authentication)."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def _connect_admin(self):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres",
                               autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        """Create an empty database (dropping one of that name first); returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        with self._connect_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def pg_ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*_run_as(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )


def _stop(c: Cluster) -> None:
    try:
        c.pg_ctl("-m", "immediate", "-w", "-t", "20", "stop", timeout=30)
    except subprocess.TimeoutExpired:
        pass
    pid_file = c.datadir / "postmaster.pid"
    if pid_file.is_file():  # pg_ctl failed or timed out: kill the postmaster we started
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


@contextlib.contextmanager
def cluster(*, attempts: int = 3) -> Iterator[Cluster]:
    """Start a fresh cluster, yield it, stop and delete it.

    Raises:
        RuntimeError: PostgreSQL is unavailable (see :func:`unavailable_reason`) or would not start.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="semla-pg-"))
    c = Cluster(bindir=bindir, root=root, port=0)
    started = False
    try:
        sockdir = root / "sock"
        sockdir.mkdir()
        if os.geteuid() == 0:
            _chown_tree(root, SUPERUSER)
        init = subprocess.run(
            [*_run_as(), str(bindir / "initdb"), "-D", str(c.datadir), "-U", SUPERUSER, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        last_error = ""
        for _ in range(attempts):  # the free port may be taken between probe and bind: retry
            c.port = free_port()
            options = (f"-c listen_addresses={c.host} -p {c.port} -k {sockdir} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            result = c.pg_ctl("-l", str(root / "server.log"), "-o", options, "-w", "-t", "30", "start", timeout=45)
            if result.returncode == 0:
                started = True
                break
            last_error = result.stderr.strip() or result.stdout.strip()
            _stop(c)
        if not started:
            log = root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"PostgreSQL did not start: {last_error}\n{tail}")
        yield c
    finally:
        if started:
            _stop(c)
        shutil.rmtree(root, ignore_errors=True)
