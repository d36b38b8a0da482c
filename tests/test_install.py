"""The registry host's install: the wheel without extras brings no torch stack, and the server starts.

Builds a wheel of this checkout, installs it into a fresh virtual environment with its bare
dependencies from the package index, and starts ``semla-server`` on loopback from there.
"""

from __future__ import annotations

import subprocess
import venv

import httpx
import pytest

from semla.server.local import local_registry
from wheelbuild import build_wheel

NOT_ON_A_REGISTRY_HOST = ("torch", "torchvision", "open_clip", "peft", "flwr")


@pytest.mark.slow
@pytest.mark.ci_slow
def test_bare_wheel_installs_without_torch_and_the_server_starts(tmp_path):
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    installed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-4000:]

    probe = f"import importlib.util; print(sorted(m for m in {NOT_ON_A_REGISTRY_HOST!r} if importlib.util.find_spec(m)))"
    found = subprocess.run([str(bin_dir / "python"), "-c", probe], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]", f"the bare install brought {found.stdout.strip()}"

    # the fresh venv's console script: only what the wheel installed is importable there
    with local_registry(tmp_path / "data", "install-test", log=tmp_path / "server.log", timeout=120,
                        exe=bin_dir / "semla-server") as url:
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
