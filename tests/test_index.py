"""The signed index snapshot (after TUF): the registry signs the library; nodes pin its key and
refuse a bad signature, another key, a rollback and an expired snapshot (freeze)."""

from __future__ import annotations

import copy
import shutil

import pytest
from fastapi.testclient import TestClient

import bundle_factory
from semla.client import publish_bundle
from semla.registry import keys
from semla.registry.http import RegistryClient
from semla.registry.node import Node
from semla.schemas import INDEX_CONTEXT, SignedIndex, canonical_json, revocation_payload
from semla.schemas.errors import SignatureError
from semla.server import ServerSettings, create_app

TOKEN = "index-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Replaying(RegistryClient):
    """A registry client that answers the index with a document chosen by the test."""

    def __init__(self, url, client, doc):
        super().__init__(url, client=client)
        self.doc = doc

    def signed_index(self) -> dict:
        return self.doc


@pytest.fixture
def registry(tmp_path, trained_bundle):
    data_dir = tmp_path / "registry"
    bundle_factory.install_base_card(data_dir)
    app = create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN))
    http = TestClient(app, base_url="http://registry.test")
    client = RegistryClient("http://registry.test", client=http)
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    bundle = shutil.copytree(trained_bundle, tmp_path / "fog")
    publish_bundle(bundle, client, key=key)
    return client, http, key, data_dir


def resign(data_dir, signed: dict) -> dict:
    registry_key = keys.load_private_key(data_dir / "registry.key")
    sig = keys.sign(registry_key, INDEX_CONTEXT + canonical_json(signed))
    return {"signed": signed, "signatures": [{"keyid": keys.key_id(registry_key), "sig": sig.hex()}]}


def test_index_is_signed_and_its_version_follows_every_change(registry, tmp_path):
    client, http, key, _ = registry
    doc = http.get("/v1/index").json()
    index = SignedIndex.model_validate(doc)
    pub = bytes.fromhex(http.get("/v1/registry-key").json()["public_key"])
    keys.verify(pub, bytes.fromhex(index.signatures[0].sig), INDEX_CONTEXT + canonical_json(doc["signed"]),
                what="the index")
    assert [a.name for a in index.signed.adapters] == ["fog"]
    assert [k.key_id for k in index.signed.keys] == [keys.key_id(key)]
    versions = [index.signed.version]

    other = keys.generate_key()
    client.register_key(keys.public_bytes(other).hex(), TOKEN)  # a key registered
    versions.append(http.get("/v1/index").json()["signed"]["version"])
    assert upload_ok(http, bundle_factory.make_bundle_files(tmp_path, other, name="second"))  # an adapter
    versions.append(http.get("/v1/index").json()["signed"]["version"])
    client.revoke("second", 1, keys.sign(other, revocation_payload("second", 1)))  # a revocation
    versions.append(http.get("/v1/index").json()["signed"]["version"])
    http.post(f"/v1/keys/{keys.key_id(other)}/revoke", headers=AUTH)  # a key revoked
    last = http.get("/v1/index").json()["signed"]
    versions.append(last["version"])
    assert versions == sorted(set(versions)), versions  # strictly increasing
    assert [k["key_id"] for k in last["keys"]] == [keys.key_id(key)]


def upload_ok(http, files) -> bool:
    return http.post("/v1/adapters", files={n: (n, d) for n, d in files.items()}).status_code == 201


def test_a_registry_key_given_out_of_band_must_match(registry, tiny_base, tmp_path):
    client, _, _, data_dir = registry
    wrong = keys.public_bytes(keys.generate_key())
    with pytest.raises(SignatureError):
        Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c1", registry_key=wrong).pull()
    right = bytes.fromhex((data_dir / "registry.key.pub").read_text())
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c2", registry_key=right)
    assert [a.name for a in node.pull()] == ["fog"]
