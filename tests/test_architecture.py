"""The package direction, checked on the import graph (DESIGN §1).

The contracts live in ``.importlinter`` at the root and run with ``lint-imports``: schemas <-
registry <- {client, server}, client and server independent, no torch, open_clip, peft or flwr
reachable from ``semla.server``, no import cycle between the modules of ``semla.registry``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("semla.schemas", "semla.registry", "semla.client", "semla.server")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert summary and int(summary[1]) == 3 and int(summary[2]) == 0, result.stdout[-2000:]


def private_imports_across_packages(graph: grimp.ImportGraph) -> list[str]:
    """Every import of a ``_name`` module by a module outside that module's own package."""
    found = []
    for imported in sorted(graph.modules):
        package, _, leaf = imported.rpartition(".")
        if not leaf.startswith("_") or leaf.startswith("__"):
            continue
        for importer in sorted(graph.find_modules_that_directly_import(imported)):
            if importer != package and not importer.startswith(package + "."):
                found.append(f"{importer} -> {imported}")
    return found


def test_the_private_module_check_tells_inside_from_outside():
    graph = grimp.ImportGraph()
    for module in ("a", "a._x", "a.y", "a.sub", "a.sub.z", "b", "b.w", "a.__init__"):
        graph.add_module(module)
    for importer, imported in [("a.y", "a._x"), ("a.sub.z", "a._x"), ("b.w", "a._x"), ("b.w", "a.__init__")]:
        graph.add_import(importer=importer, imported=imported)
    assert private_imports_across_packages(graph) == ["b.w -> a._x"]


def test_no_module_imports_a_private_module_of_another_package():
    violations = private_imports_across_packages(grimp.build_graph(*PACKAGES))
    assert violations == [], "private modules imported from outside their package:\n" + "\n".join(violations)
