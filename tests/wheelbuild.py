"""Building a wheel of this checkout for the packaging and bare-install tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from (pyproject's package folders and the files it names).
SOURCES = ("schemas", "registry", "client", "server", "pyproject.toml", "README.md")


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the checkout's sources, built from a fresh copy of them: a stale ``build/``
    folder left in the checkout by an older version never leaks files into it."""
    src, out = tmp_path / "wheel-src", tmp_path / "wheels"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("*.whl")
    return wheel
