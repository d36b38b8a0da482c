"""Request dependencies shared by the registry's routers: what ``create_app`` keeps on ``app.state``.

They are ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a hop to
another thread and back on every request just to read an attribute.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from semla.server.service import RegistryService
from semla.server.settings import ServerSettings

__all__ = ["ServiceDep", "SettingsDep"]


async def _service(request: Request) -> RegistryService:
    return request.app.state.service


async def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


ServiceDep = Annotated[RegistryService, Depends(_service)]
SettingsDep = Annotated[ServerSettings, Depends(_settings)]
