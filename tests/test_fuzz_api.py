"""Schemathesis fuzzing of the registry's HTTP API against its own served OpenAPI document.

The app is called in-process (``schemathesis.openapi.from_asgi``: no socket, no server). It is
a fresh registry with an admin token, one registered publisher key and one published adapter
(``city-streets`` v1), so the GET routes have something to find. Every operation of
``/openapi.json`` gets positive and negative cases (Schemathesis' examples, coverage and
fuzzing phases); every response must be

* no 5xx (``not_a_server_error``),
* a status code the operation declares (``status_code_conformance``),
* of a declared content type (``content_type_conformance``),
* valid against the declared response schema (``response_schema_conformance``), so every
  4xx is ``{"error": {"code", "message"}}``,
* an undeclared method answered 405 with an ``Allow`` header (``unsupported_method``) that names
  every documented method of the path (``allow_header_conformance``).

The schema is loaded at import (one operation per test item). ``schemathesis.pytest.from_fixture``
would defer that to a fixture, but schemathesis 4.32 sets ``request.node._nodeid`` there, which
pytest 9.2 no longer has. The registry lives in a temporary directory removed at exit.

Bounded for the default suite (25 examples per operation, derandomized, no example database);
``benchmarks/fuzz_api.py`` runs the same fuzzing with many more examples.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import bundle_factory
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from semla.registry import keys
from semla.schemas import BUNDLE_FILES, MANIFEST_FILE
from semla.server import ServerSettings, create_app

ADMIN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ADAPTER = {"name": "city-streets", "version": 1}

#: What every generated response must satisfy.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    unsupported_method,
    allow_header_conformance,
]

#: Hypothesis settings for the default suite: bounded and reproducible.
FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def seeded_registry(tmp: Path) -> FastAPI:
    """A registry under ``tmp``: admin token set, one publisher key, ``city-streets`` v1 published.

    Seeded through the app itself, so the fuzzed state is one a real client could build.
    """
    bundle_factory.install_base_card(tmp / "data")
    app = create_app(ServerSettings(data_dir=tmp / "data", admin_token=ADMIN))
    key = keys.generate_key()
    client = TestClient(app)
    resp = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": "fuzz"}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    files = bundle_factory.make_bundle_files(tmp, key, **ADAPTER)
    parts = {name: (name, data, "application/octet-stream") for name, data in files.items()}
    resp = client.post("/v1/adapters", files=parts)
    assert resp.status_code == 201, resp.text
    return app


def _registry_for_this_module() -> FastAPI:
    tmp = Path(tempfile.mkdtemp(prefix="semla-fuzz-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return seeded_registry(tmp)


APP = _registry_for_this_module()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def api_schema():
    return schema


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_conforms_to_its_openapi(case):
    # The admin token goes on every request; negative cases still drop it to probe the 401 path.
    case.call_and_validate(headers=AUTH, checks=CHECKS)


def test_every_route_is_fuzzed(api_schema):
    """The served document lists every route (a route left out of it would be left out of the fuzzing)."""
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == {
        "GET /healthz",
        "GET /v1/keys",
        "POST /v1/keys",
        "GET /v1/adapters",
        "POST /v1/retrieve",
        "GET /tuf/metadata/{filename}",
        "GET /tuf/targets/{path}",
        "POST /v1/keys/{key_id}/revoke",
        "GET /v1/keys/{key_id}/privacy",
        "POST /v1/keys/rotate",
        "POST /v1/adapters/{name}/{version}/revoke",
        "POST /v1/adapters",
        "GET /v1/adapters/{name}",
        "GET /v1/adapters/{name}/{version}/manifest",
        "GET /v1/adapters/{name}/{version}/files/{filename}",
    }


@pytest.mark.parametrize("filename", [None, *BUNDLE_FILES])
def test_found_responses_conform(api_schema, filename):
    """The 200 of the byte routes (random names rarely hit the one stored adapter) meets the document."""
    if filename is None:
        operation = api_schema["/v1/adapters/{name}/{version}/manifest"]["GET"]
        case = operation.Case(path_parameters=dict(ADAPTER))
    else:
        operation = api_schema["/v1/adapters/{name}/{version}/files/{filename}"]["GET"]
        case = operation.Case(path_parameters={**ADAPTER, "filename": filename})
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == 200
    if filename == MANIFEST_FILE or filename is None:
        assert response.json()["name"] == ADAPTER["name"]
