"""Guards for the one-namespace layout (DESIGN §1)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from wheelbuild import build_wheel

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"registry": "semla.registry", "client": "semla.client", "server": "semla.server", "schemas": "semla.schemas"}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}


def test_bare_folder_names_are_not_importable():
    assert not (ROOT / "tests" / "__init__.py").exists()
    for bare in FOLDERS:
        assert importlib.util.find_spec(bare) is None, f"bare {bare!r} importable: a second copy of the package"


@pytest.mark.parametrize("name", sorted(FOLDERS.values()))
def test_semla_packages_come_from_the_project_folders(name):
    module = importlib.import_module(name)
    folder = [k for k, v in FOLDERS.items() if v == name][0]
    assert Path(module.__file__).resolve().parent == ROOT / folder


#: What a registry host does not install (pyproject's bare dependencies); never loaded by the server.
NODE_AND_CLIENT_ONLY = ("torch", "torchvision", "open_clip", "peft", "flwr")


def test_server_imports_without_torch():
    code = ("import importlib, pkgutil, sys\n"
            "import semla.server\n"
            "for info in pkgutil.walk_packages(semla.server.__path__, 'semla.server.'):\n"
            "    importlib.import_module(info.name)\n"
            "import semla.schemas, semla.registry.bundle, semla.registry.retrieval, semla.registry.http\n"
            f"print(sorted(m for m in {NODE_AND_CLIENT_ONLY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing semla.server loaded {result.stdout.strip()}"


def test_wheel_holds_every_subpackage_and_the_weights(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("semla/registry/node.py", "semla/client/cli.py", "semla/server/app.py", "semla/schemas/manifest.py",
                     "semla/registry/weights/semla-tiny.safetensors", "semla/registry/model_configs/semla-tiny.json",
                     "semla/registry/base_cards/semla-tiny.json"):
        assert required in names
    assert not any(n.split("/")[0] in FOLDERS for n in names), "a bare top-level package leaked into the wheel"
