"""The registry's HTTP API: ``create_app(settings)`` builds a FastAPI app.

Nothing is created at import: the engine, sessions, blob store and service are built inside
:func:`create_app` and kept on ``app.state``. Routes are thin: parse the request, call one
:class:`~semla.server.service.RegistryService` method, format the answer. Every error is
``{"error": {"code": ..., "message": ...}}`` (see :mod:`semla.server._errors`).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from semla.registry.asgi import (
    ERROR_RESPONSES,
    BodyGuard,
    Part,
    frozen_heap,
    install_error_handlers,
    install_offline_docs,
    read_multipart,
)
from semla.schemas import (
    BUNDLE_FILES,
    MANIFEST_FILE,
    NAME_PATTERN,
    AdapterSummary,
    KeyCreate,
    KeyPublic,
    PrivacyLedger,
    RetrieveRequest,
    RetrieveResponse,
    RevokeRequest,
    RotateRequest,
    UploadReceipt,
)
from semla.schemas.errors import FileSetError
from semla.server.service import RegistryService
from semla.server.bases import BaseCardStore
from semla.server.blobs import BlobStore
from semla.server.db import check_schema, make_engine, make_sessionmaker
from semla.server.deps import ServiceDep, SettingsDep
from semla.server.metrics import install_metrics
from semla.server.paging import DEFAULT_LIMIT, MAX_CURSOR_CHARS, MAX_LIMIT, Page
from semla.server.settings import ServerSettings
from semla.server.tufroutes import router as tuf_router
from semla.server.tufsync import TufSync, ensure_repository
from semla.server.web import add_web_routes

__all__ = ["create_app"]


def _version() -> str:
    try:
        return metadata.version("semla-registry")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


# -- dependencies ---------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="the registry's admin token (SEMLA_ADMIN_TOKEN)")


async def _require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if settings.admin_token is None:
        raise HTTPException(
            503,
            detail={
                "code": "admin_disabled",
                "message": "admin endpoints are disabled: start the registry with SEMLA_ADMIN_TOKEN set",
            },
        )
    expected = settings.admin_token.get_secret_value().encode("utf-8")
    given = credentials.credentials.encode("utf-8") if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise HTTPException(
            401,
            detail={"code": "unauthorized", "message": "missing or wrong admin token (Authorization: Bearer ...)"},
            headers={"WWW-Authenticate": "Bearer"},
        )


Cursor = Annotated[str | None, Query(
    max_length=MAX_CURSOR_CHARS,
    description="the cursor of the previous page, from its `Link: <...>; rel=\"next\"` header (opaque)")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]

#: What every paged listing says about its pages (OpenAPI).
_PAGED = ("Paged: at most `limit` items per page; when more follow, the answer carries "
          "`Link: <URL of the next page>; rel=\"next\"` (RFC 8288). Follow it unchanged (same filters) until "
          "no `Link` comes back. A cursor that was not handed out for these filters is refused as `bad_cursor` (400).")
_PAGED_RESPONSES = {
    200: {"headers": {"Link": {"description": "`<URL>; rel=\"next\"` when another page follows",
                               "schema": {"type": "string"}}}},
    400: {**ERROR_RESPONSES, "description": "bad_cursor: not a cursor of this listing with these filters"},
    422: ERROR_RESPONSES,
}


_KEYS_ENCODER = TypeAdapter(list[KeyPublic])


def _paged(request: Request, page: Page) -> Response:
    """The page's items as a JSON list; a ``Link: <...>; rel="next"`` header when another page follows.

    Items are either each one's JSON already (the adapter listings: the service's ``as_json``)
    or publisher keys, encoded by pydantic-core in one call (the route's ``response_model``
    documents the shape either way).
    """
    headers = {}
    if page.next_cursor is not None:
        headers["Link"] = f'<{request.url.include_query_params(cursor=page.next_cursor)}>; rel="next"'
    if all(isinstance(item, bytes) for item in page.items):
        body = b"[" + b",".join(page.items) + b"]"
    else:
        body = _KEYS_ENCODER.dump_json(page.items)
    return Response(body, media_type="application/json", headers=headers)


AdapterName = Annotated[str, Path(pattern=NAME_PATTERN, description="adapter name", examples=["city-streets"])]
Version = Annotated[int, Path(ge=1, le=2**53, description="adapter version")]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the four bundle files, each a form part named exactly by its file name",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": list(BUNDLE_FILES),
                    "properties": {name: {"type": "string", "format": "binary"} for name in BUNDLE_FILES},
                }
            }
        },
    }
}

#: Refusals of any request body by BodyGuard (too slow, too large, JSON too deep or too big).
_BODY_REFUSALS = {
    408: {**ERROR_RESPONSES, "description": "body_timeout: the request body arrived too slowly"},
    413: {**ERROR_RESPONSES, "description": "too_large"},
}

#: More parts than this is not a bundle (it has four files); refused before they are buffered.
MAX_PARTS = 16


def _bundle_part(name: str, parts: list[Part]) -> None:
    """Refuse a part sent twice or far too many parts; check_bundle judges the names."""
    if len(parts) >= MAX_PARTS:
        raise FileSetError(f"upload has more than {MAX_PARTS} parts", code="extra_file")
    if any(p.name == name for p in parts):
        raise FileSetError(f"bundle file {name} was sent more than once", code="extra_file")


# -- routes ---------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/healthz", tags=["ops"], summary="Liveness probe")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post(
    "/v1/keys",
    tags=["keys"],
    status_code=201,
    summary="Register a publisher key (admin)",
    dependencies=[Depends(_require_admin)],
    responses={
        **_BODY_REFUSALS,
        400: ERROR_RESPONSES,
        401: ERROR_RESPONSES,
        409: {**ERROR_RESPONSES, "description": "key_exists"},
        422: ERROR_RESPONSES,
        503: {**ERROR_RESPONSES, "description": "admin_disabled: no admin token configured"},
    },
)
def register_key(body: KeyCreate, service: ServiceDep) -> KeyPublic:
    return service.register_key(body)


@router.get("/v1/keys", tags=["keys"], summary="List publisher keys, oldest first", description=_PAGED,
            response_model=list[KeyPublic], responses=_PAGED_RESPONSES)
def list_keys(request: Request, service: ServiceDep, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT) -> Response:
    return _paged(request, service.list_keys(cursor=cursor, limit=limit))


@router.post(
    "/v1/adapters",
    tags=["adapters"],
    status_code=201,
    summary="Publish a signed adapter bundle",
    description=(
        "Verifies the bundle (file set, manifest schema, signature by an active registered key, "
        "file hashes, adapter config, safetensors header), that it fits the card of the base it names "
        "(unknown_base; shapes, rank, alpha, embedding space, values and per-layer effect bounds), the version rule (name unused or "
        "owned by the signer, version strictly greater than the last), the registry's minimum "
        "sample count (SEMLA_MIN_SAMPLES) and the publisher's DP budget (SEMLA_EPSILON_BUDGET, "
        "charged with the manifest's privacy.epsilon). A refused upload leaves nothing behind."
    ),
    openapi_extra=_UPLOAD_BODY,
    responses={
        **_BODY_REFUSALS,
        400: ERROR_RESPONSES,
        403: {**ERROR_RESPONSES, "description": "bad_signature, unsigned, unknown_key, key_revoked, key_rotated, "
              "privacy_budget: the manifest's epsilon would take its publisher above the budget"},
        409: {**ERROR_RESPONSES, "description": "name_taken, stale_version"},
        429: {**ERROR_RESPONSES, "description": "rate_limited: too many uploads by this publisher key"},
        422: {
            **ERROR_RESPONSES,
            "description": "missing_file, extra_file, manifest_invalid, hash_mismatch, tensor_format, "
            "too_few_samples, unknown_base, base_mismatch, embedding_mismatch, centroid_dim, rank_too_large, "
            "alpha_too_large, unknown_target, empty_tensor, shape_mismatch, value_too_large, effect_too_large, ...",
        },
    },
)
async def publish_adapter(request: Request, service: ServiceDep, settings: SettingsDep) -> UploadReceipt:
    parts = await read_multipart(request, max_bytes=settings.max_upload_bytes, accept=_bundle_part)
    files = {part.name: part.data for part in parts}
    return await run_in_threadpool(service.publish, files)


@router.get(
    "/v1/adapters",
    tags=["adapters"],
    summary="Index: newest version of every adapter, by name",
    description=_PAGED,
    response_model=list[AdapterSummary],
    responses=_PAGED_RESPONSES,
)
def list_adapters(
    request: Request,
    service: ServiceDep,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN, description="only this adapter name")] = None,
    domain: Annotated[str | None, Query(max_length=256, description="substring of the domain (any case)")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Response:
    return _paged(request, service.list_adapters(name=name, domain=domain, cursor=cursor, limit=limit, as_json=True))


@router.post(
    "/v1/keys/rotate",
    tags=["keys"],
    status_code=201,
    summary="Rotate a publisher key (signed by the old key)",
    description="Registers the new key; the old one publishes no more, the adapters it signed stay valid, "
    "and its adapter names pass to the new key. The old key signs `semla-rotate-v1\\n` + canonical JSON "
    "`{new_public_key, old_key_id}`.",
    responses={**_BODY_REFUSALS, 400: ERROR_RESPONSES, 403: ERROR_RESPONSES, 404: ERROR_RESPONSES,
               409: ERROR_RESPONSES, 422: ERROR_RESPONSES},
)
def rotate_key(body: RotateRequest, service: ServiceDep) -> KeyPublic:
    return service.rotate_key(body)


@router.get(
    "/v1/keys/{key_id}/privacy",
    tags=["keys"],
    summary="A publisher's DP epsilon ledger: budget, spent, remaining, entries",
    description="Every adapter version whose centroid was released with DP (manifest privacy.epsilon), "
    "charged to the publisher: the key and every key of its rotation chain together. Revoking a version "
    "refunds nothing. `budget` and `remaining` are null when the registry sets no limit.",
    responses={404: ERROR_RESPONSES, 422: ERROR_RESPONSES},
)
def privacy_ledger(key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], service: ServiceDep) -> PrivacyLedger:
    return service.privacy_ledger(key_id)


@router.post(
    "/v1/keys/{key_id}/revoke",
    tags=["keys"],
    summary="Revoke a publisher key (admin): its adapters leave the index",
    dependencies=[Depends(_require_admin)],
    responses={**_BODY_REFUSALS, 400: ERROR_RESPONSES, 401: ERROR_RESPONSES, 404: ERROR_RESPONSES,
               422: ERROR_RESPONSES, 503: ERROR_RESPONSES},
)
def revoke_key(key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], service: ServiceDep) -> KeyPublic:
    return service.revoke_key(key_id)


@router.post(
    "/v1/adapters/{name}/{version}/revoke",
    tags=["adapters"],
    summary="Revoke one adapter version (signed by its publisher)",
    description="The body holds the publisher's Ed25519 signature over "
    '`semla-revoke-v1\\n` + canonical JSON `{"name": ..., "version": ...}`, by the publisher\'s current key: '
    "the key that published the version or, after rotations, the last key of its chain (a key rotated away "
    "can revoke nothing). A revoked version leaves the index (the previous live version, if any, takes its "
    "place), its files answer 410, and nodes drop it at their next pull.",
    responses={**_BODY_REFUSALS, 400: ERROR_RESPONSES, 403: {**ERROR_RESPONSES, "description": "bad_signature, "
               "key_rotated: signed by a key its publisher rotated away, key_revoked"}, 404: ERROR_RESPONSES,
               409: ERROR_RESPONSES, 422: ERROR_RESPONSES},
)
def revoke_version(name: AdapterName, version: Version, body: RevokeRequest, service: ServiceDep) -> AdapterSummary:
    return service.revoke_version(name, version, bytes.fromhex(body.signature))


@router.post(
    "/v1/retrieve",
    tags=["retrieval"],
    summary="Nearest adapters to one embedding (for thin clients)",
    description=(
        "SemLA retrieval on the registry, for clients that cannot run it themselves: distance = min over "
        "an adapter's centroids (euclidean between unit vectors, or cosine), top-k, fusion weights by the named "
        "`weighting` scheme (default `calibrated`), the base's weight with `guard`. "
        "Same math as the node's local retrieval; a node that retrieves locally never sends its query."
    ),
    response_model=RetrieveResponse,
    responses={**_BODY_REFUSALS, 404: {**ERROR_RESPONSES, "description": "no adapter of this base"},
               422: ERROR_RESPONSES, 400: ERROR_RESPONSES},
)
def retrieve(body: RetrieveRequest, service: ServiceDep) -> Response:
    # encoded here, in the worker thread: a returned model would be serialised in a second hop
    return Response(service.retrieve(body).model_dump_json(), media_type="application/json")


@router.get(
    "/v1/adapters/{name}",
    tags=["adapters"],
    summary="Every version of one adapter, newest first",
    description=_PAGED,
    response_model=list[AdapterSummary],
    responses={**_PAGED_RESPONSES, 404: ERROR_RESPONSES},
)
def adapter_versions(request: Request, name: AdapterName, service: ServiceDep, cursor: Cursor = None,
                     limit: Limit = DEFAULT_LIMIT) -> Response:
    return _paged(request, service.adapter_versions(name, cursor=cursor, limit=limit, as_json=True))


@router.get(
    "/v1/adapters/{name}/{version}/manifest",
    tags=["adapters"],
    summary="The stored manifest.json bytes",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "manifest.json, byte-identical"},
        404: ERROR_RESPONSES,
        410: {**ERROR_RESPONSES, "description": "revoked: the version or its publisher key was revoked"},
        422: ERROR_RESPONSES,
    },
)
def get_manifest(name: AdapterName, version: Version, service: ServiceDep) -> Response:
    return Response(service.file_bytes(name, version, MANIFEST_FILE), media_type="application/json")


@router.get(
    "/v1/adapters/{name}/{version}/files/{filename}",
    tags=["adapters"],
    summary="One bundle file, byte-identical",
    description=f"`filename` is one of: {', '.join(BUNDLE_FILES)}.",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"},
        404: ERROR_RESPONSES,
        410: {**ERROR_RESPONSES, "description": "revoked: the version or its publisher key was revoked"},
        422: ERROR_RESPONSES,
    },
)
def get_file(name: AdapterName, version: Version, filename: str, service: ServiceDep) -> FileResponse:
    return FileResponse(service.file_path(name, version, filename), media_type="application/octet-stream")


# -- factory --------------------------------------------------------------------------------------
def create_app(settings: ServerSettings) -> FastAPI:
    """Build the registry app: data dir, database schema, blob store, routes, error handlers.

    Raises:
        OSError: the data directory cannot be created.
        sqlalchemy.exc.SQLAlchemyError: the database URL is invalid or unreachable.
        semla.server.db.SchemaError: the database is not at this code's schema revision (an
            empty SQLite database is migrated here; anything else needs ``semla-server db upgrade``).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        check_schema(engine, upgrade_if_empty=engine.dialect.name == "sqlite")
    except BaseException:
        engine.dispose()
        raise
    blobs = BlobStore(settings.data_dir / "blobs")
    read_engine = make_engine(settings.resolved_database_url, autocommit=True)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        with frozen_heap():
            yield
        engine.dispose()
        read_engine.dispose()

    app = FastAPI(
        title="SemLA adapter registry",
        version=_version(),
        description=(
            "Registry of signed LoRA adapters for open-vocabulary segmentation. Publishers upload "
            "signed bundles; nodes pull the index (with centroids, for local retrieval) and the "
            "files, and verify every signature again before loading."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyGuard, limits=settings.body_limits())
    install_offline_docs(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.blobs = blobs
    sessions = make_sessionmaker(engine)
    app.state.service = RegistryService(
        sessions, blobs, uploads_per_minute=settings.uploads_per_minute,
        min_samples=settings.min_samples, epsilon_budget=settings.epsilon_budget,
        base_cards=BaseCardStore(settings.base_cards_dir), reads=read_engine.connect,
        recheck_s=settings.retrieval_recheck_s,
    )
    app.state.tuf_repo = ensure_repository(settings.data_dir / "tuf", sessions,
                                           legacy_key_file=settings.resolved_registry_key_file,
                                           timestamp_ttl=settings.index_ttl_seconds)
    app.state.service.tuf = TufSync(app.state.tuf_repo)
    install_error_handlers(app, service="registry")
    if settings.metrics:
        install_metrics(app, engine, settings.epsilon_budget)
    app.include_router(router)
    app.include_router(tuf_router)
    add_web_routes(app)
    return app
