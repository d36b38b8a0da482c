"""Shared fixtures: a tiny base model, a small trained library (fog, night), keys, a free loopback port."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN_DIR = Path(__file__).parent / "goldens"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", help="rewrite tests/goldens/* from the current code")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture(scope="session")
def tiny_base():
    """The bundled semla-tiny base (shared: do not mutate; use ``fresh_base``)."""
    from semla.registry.model import load_base

    return load_base()


@pytest.fixture
def fresh_base(tiny_base):
    return copy.deepcopy(tiny_base)


@pytest.fixture(scope="session")
def fog_data(tmp_path_factory) -> Path:
    from semla.registry import synth

    return synth.write_dataset("fog", 50, 7, tmp_path_factory.mktemp("data") / "fog")


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, fog_data, tiny_base) -> Path:
    """An unsigned bundle trained for a few steps on 50 fog images (kept read-only by tests)."""
    from semla.registry.train import TrainConfig, train_adapter

    out = tmp_path_factory.mktemp("bundles") / "fog"
    train_adapter(fog_data, out, "fog", TrainConfig(steps=8, lr=5e-3, seed=3), base=tiny_base, progress=False)
    return out


@pytest.fixture(scope="session")
def night_bundle(tmp_path_factory, tiny_base) -> Path:
    """An unsigned bundle trained like ``trained_bundle`` on 50 night images (kept read-only by tests)."""
    from semla.registry import synth
    from semla.registry.train import TrainConfig, train_adapter

    root = tmp_path_factory.mktemp("night")
    data = synth.write_dataset("night", 50, 11, root / "data")
    train_adapter(data, root / "night", "night", TrainConfig(steps=8, lr=5e-3, seed=3), base=tiny_base, progress=False)
    return root / "night"


@pytest.fixture(scope="session")
def fog_night_library(trained_bundle, night_bundle) -> dict[str, Path]:
    """The two-adapter library that node, explain and serve tests publish (copy before signing)."""
    return {"fog": trained_bundle, "night": night_bundle}


@pytest.fixture
def free_port() -> int:
    from semla.server.local import free_port as pick

    return pick()


_db_names = itertools.count()


@pytest.fixture(scope="session")
def cluster():
    """A throwaway PostgreSQL cluster on loopback (skipped where PostgreSQL is not installed)."""
    import pg

    reason = pg.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with pg.cluster() as c:
        yield c


@pytest.fixture()
def pg_url(cluster) -> str:
    """An empty PostgreSQL database of its own (no schema)."""
    return cluster.create_database(f"semla_{next(_db_names)}")
