"""``/tuf/metadata/`` and ``/tuf/targets/``: the registry's TUF repository as static files.

The layout is the standard one, so a stock ``tuf.ngclient.Updater`` works against it::

    Updater(metadata_dir, f"{URL}/tuf/metadata/", target_dir, f"{URL}/tuf/targets/", bootstrap=root)

Metadata is written when the library changes (:mod:`semla.server.tufrepo`) and served here as
bytes with a strong ETag (answering ``If-None-Match`` with 304): versioned files are immutable
(cached for a year), ``timestamp.json`` must be revalidated. Adapter targets
(``adapters/NAME/VERSION/HASH.FILENAME``, hash-prefixed for consistent snapshots) come from the
blob store after the database confirms that file of that version has that digest.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import FileResponse

from semla.registry.asgi import ERROR_RESPONSES
from semla.schemas import BUNDLE_FILES
from semla.schemas.errors import NotFoundError
from semla.server.deps import ServiceDep
from semla.server.tufrepo import TufRepository

__all__ = ["router"]

_METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,15}\.)?[a-z][a-z0-9-]{0,31}\.json$")
_STORED_TARGET = re.compile(r"^(shards|keys)/([0-9a-f]{64})\.([a-z0-9]{1,32}\.[a-z]{1,16})$")
_ADAPTER_TARGET = re.compile(r"^adapters/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/([1-9][0-9]{0,15})/([0-9a-f]{64})\.(.+)$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, max-age=0, must-revalidate"


async def _repo(request: Request) -> TufRepository:
    repo = request.app.state.tuf_repo
    if repo is None:
        raise NotFoundError("this registry publishes no TUF metadata")
    return repo


RepoDep = Annotated[TufRepository, Depends(_repo)]

router = APIRouter()


def _not_modified(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match", "")
    return etag in [t.strip() for t in given.split(",")] or given.strip() == "*"


@router.get(
    "/tuf/metadata/{filename}",
    tags=["tuf"],
    summary="TUF metadata (N.root.json, timestamp.json, N.snapshot.json, N.targets.json, N.bins-XXXX.json)",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}, 304: {"description": "not modified"},
               404: ERROR_RESPONSES, 422: ERROR_RESPONSES},
)
def tuf_metadata(filename: Annotated[str, Path(max_length=64)], request: Request, repo: RepoDep) -> Response:
    if not _METADATA_NAME.match(filename):
        raise NotFoundError(f"no TUF metadata file {filename!r}")
    mutable = filename in ("timestamp.json", "root.json")
    if filename == "timestamp.json":
        repo.refresh_if_stale()
    try:
        data = repo.metadata_bytes(filename)
    except FileNotFoundError:
        raise NotFoundError(f"no TUF metadata file {filename!r}") from None
    etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": REVALIDATE if mutable else IMMUTABLE}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="application/json", headers=headers)


@router.get(
    "/tuf/targets/{path:path}",
    tags=["tuf"],
    summary="A TUF target by its hash-prefixed path (adapter files, shards, the publisher keys)",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "not modified"},
               404: ERROR_RESPONSES, 410: ERROR_RESPONSES},
)
def tuf_target(path: Annotated[str, Path(max_length=512)], request: Request, repo: RepoDep,
               service: ServiceDep) -> Response:
    stored = _STORED_TARGET.match(path)
    adapter = _ADAPTER_TARGET.match(path)
    if stored is not None:
        digest = stored.group(2)
        file = repo.targets_dir / stored.group(1) / f"{digest}.{stored.group(3)}"
        if not file.is_file():
            raise NotFoundError(f"no TUF target {path!r}")
    elif adapter is not None and adapter.group(4) in BUNDLE_FILES:
        name, version, digest, filename = adapter.groups()
        file = service.file_path(name, int(version), filename)
        if file.name != digest:  # blobs are stored under their sha256
            raise NotFoundError(f"{name} v{version}/{filename} has another digest than {digest[:12]}")
    else:
        raise NotFoundError(f"no TUF target {path!r}")
    etag = f'"{digest[:32]}"'  # the path names the content's hash
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return FileResponse(file, media_type="application/octet-stream", headers=headers)
