"""The Flower app directory ``flwr run`` packs, and the checks on its run settings."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from semla.schemas.errors import InvalidInputError

if TYPE_CHECKING:
    from semla.client.flower_app import RunSettings


APP_REF = "semla.client.flower_app"


def write_app(app_dir: Path, settings: RunSettings) -> None:
    """The Flower app directory ``flwr run`` packs: a pyproject naming the components by import path."""
    import tomli_w

    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "semla-federated", "version": "1.0.0", "description": "SemLA federated LoRA training",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "semla",
            "components": {"serverapp": f"{APP_REF}:server_app", "clientapp": f"{APP_REF}:client_app"},
            "config": settings.to_run_config(),
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


def check_settings(settings: RunSettings) -> None:
    out = Path(settings.out)
    if not out.is_absolute():
        raise InvalidInputError(f"the output path {out} must be absolute (the ServerApp runs elsewhere)")
    if out.exists():
        raise InvalidInputError(f"{out} already exists; choose a new --out")
    if not out.parent.is_dir():
        raise InvalidInputError(f"{out.parent} does not exist")
    if not settings.classes or any(not c.strip() or "\n" in c for c in settings.classes):
        raise InvalidInputError("the class list is empty or holds an empty name")
