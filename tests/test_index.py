"""The library's TUF trust from the node's side: the snapshot version follows every change, the
key list holds the active publisher keys, and a root given out of band must match."""

from __future__ import annotations

import copy
import shutil

import pytest
from fastapi.testclient import TestClient
from tuf_view import snapshot_version, tuf_view

import bundle_factory
from semla.client import publish_bundle
from semla.registry import keys
from semla.registry.http import RegistryClient
from semla.registry.node import Node
from semla.schemas import revocation_payload
from semla.schemas.errors import SemlaError
from semla.server import ServerSettings, create_app
from semla.server.tufrepo import TufRepository

TOKEN = "index-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "http://registry.test"


@pytest.fixture
def registry(tmp_path, trained_bundle):
    data_dir = tmp_path / "registry"
    bundle_factory.install_base_card(data_dir)
    app = create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN))
    http = TestClient(app, base_url=URL)
    client = RegistryClient(URL, client=http)
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    bundle = shutil.copytree(trained_bundle, tmp_path / "fog")
    publish_bundle(bundle, client, key=key)
    return client, http, key, data_dir


def upload_ok(http, files) -> bool:
    return http.post("/v1/adapters", files={n: (n, d) for n, d in files.items()}).status_code == 201


def test_the_snapshot_version_follows_every_change(registry, tmp_path):
    client, http, key, _ = registry
    view = tuf_view(http, URL, tmp_path / "view")
    assert [a.name for a in view.library()] == ["fog"]
    assert list(view.keys) == [keys.key_id(key)]
    versions = [view.version]
    assert versions[0] == snapshot_version(http)

    other = keys.generate_key()
    client.register_key(keys.public_bytes(other).hex(), TOKEN)  # a key registered
    versions.append(snapshot_version(http))
    assert upload_ok(http, bundle_factory.make_bundle_files(tmp_path, other, name="second"))  # an adapter
    versions.append(snapshot_version(http))
    client.revoke("second", 1, keys.sign(other, revocation_payload("second", 1)))  # a revocation
    versions.append(snapshot_version(http))
    http.post(f"/v1/keys/{keys.key_id(other)}/revoke", headers=AUTH)  # a key revoked
    versions.append(snapshot_version(http))
    assert versions == sorted(set(versions)), versions  # strictly increasing
    view.refresh()  # the same node, refreshed
    assert view.version == versions[-1]
    assert list(view.keys) == [keys.key_id(key)]
    assert [a.name for a in view.library()] == ["fog"]


def test_a_root_given_out_of_band_must_match(registry, tiny_base, tmp_path):
    client, _, _, data_dir = registry
    other = TufRepository.create(tmp_path / "other-tuf", [keys.generate_key()], 1)
    wrong = (other.metadata_dir / "1.root.json").read_bytes()
    with pytest.raises(SemlaError) as info:
        Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c1", root=wrong).pull()
    assert info.value.code == "tuf_signature", info.value
    right = (data_dir / "tuf" / "metadata" / "1.root.json").read_bytes()
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c2", root=right)
    assert [a.name for a in node.pull()] == ["fog"]
