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
from semla.schemas.errors import SignatureError, VerificationError
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


def test_node_pins_the_key_and_refuses_tampering_rollback_and_freeze(registry, tiny_base, tmp_path):
    client, http, key, data_dir = registry
    cache = tmp_path / "cache"
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=cache)
    node.pull()
    first = http.get("/v1/index").json()
    assert node.index_version == first["signed"]["version"]

    tampered = copy.deepcopy(first)
    tampered["signed"]["adapters"][0]["domain"] = "sunny beach"
    with pytest.raises(SignatureError):
        Node(Replaying(client.url, http, tampered), base=node.base, cache_dir=cache).pull()

    impostor = keys.generate_key()
    forged = {"signed": first["signed"], "signatures": [{"keyid": keys.key_id(impostor), "sig": keys.sign(
        impostor, INDEX_CONTEXT + canonical_json(first["signed"])).hex()}]}
    with pytest.raises(SignatureError) as info:
        Node(Replaying(client.url, http, forged), base=node.base, cache_dir=cache).pull()  # pinned key wins
    assert info.value.code == "registry_key"

    client.register_key(keys.public_bytes(keys.generate_key()).hex(), TOKEN)  # the library moves on
    node.pull()
    with pytest.raises(VerificationError) as info:
        Node(Replaying(client.url, http, first), base=node.base, cache_dir=cache).pull()  # replay the old one
    assert info.value.code == "rollback"

    expired = resign(data_dir, {**http.get("/v1/index").json()["signed"], "expires": "2020-01-01T00:00:00Z"})
    with pytest.raises(VerificationError) as info:
        Node(Replaying(client.url, http, expired), base=node.base, cache_dir=cache).pull()
    assert info.value.code == "index_expired"


def test_a_registry_key_given_out_of_band_must_match(registry, tiny_base, tmp_path):
    client, _, _, data_dir = registry
    wrong = keys.public_bytes(keys.generate_key())
    with pytest.raises(SignatureError):
        Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c1", registry_key=wrong).pull()
    right = bytes.fromhex((data_dir / "registry.key.pub").read_text())
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "c2", registry_key=right)
    assert [a.name for a in node.pull()] == ["fog"]


def test_pins_are_kept_per_registry(registry, trained_bundle, tiny_base, tmp_path):
    client, *_ = registry
    cache = tmp_path / "shared-cache"
    Node(client, base=copy.deepcopy(tiny_base), cache_dir=cache).pull()
    app = create_app(ServerSettings(data_dir=tmp_path / "second", admin_token=TOKEN))  # another registry key
    second = RegistryClient("http://second.test", client=TestClient(app, base_url="http://second.test"))
    key = keys.generate_key()
    second.register_key(keys.public_bytes(key).hex(), TOKEN)
    publish_bundle(shutil.copytree(trained_bundle, tmp_path / "fog2"), second, key=key)
    assert [a.name for a in Node(second, base=copy.deepcopy(tiny_base), cache_dir=cache).pull()] == ["fog"]
    assert len(list((cache / "registry-keys").iterdir())) == 2


def test_nodes_follow_a_rotated_registry_key_and_refuse_a_forged_rotation(registry, tiny_base, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    client, _, _, data_dir = registry
    cache = tmp_path / "cache"
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=cache)
    node.pull()
    old_pin = node.registry_key
    for _ in range(2):  # two rotations: the node follows the whole chain
        done = subprocess.run([str(Path(sys.executable).with_name("semla-server")), "rotate-registry-key",
                               "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "rotated the registry key" in done.stdout, done.stderr
    app = create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN))  # the restarted registry
    http = TestClient(app, base_url="http://registry.test")
    doc = http.get("/v1/index").json()
    assert len(doc["root_rotations"]) == 2

    fresh = Node(RegistryClient(client.url, client=http), base=node.base, cache_dir=cache)
    assert fresh._pinned_key() == old_pin  # still pinned to the first key
    assert [a.name for a in fresh.pull()] == ["fog"]
    assert fresh.registry_key == bytes.fromhex((data_dir / "registry.key.pub").read_text())
    assert fresh._pinned_key() != old_pin  # the new pin is remembered

    impostor = keys.generate_key()
    forged = copy.deepcopy(doc)
    forged["root_rotations"][0]["new_public_key"] = keys.public_bytes(impostor).hex()  # not signed by the old key
    forged["signatures"] = [{"keyid": keys.key_id(impostor), "sig": keys.sign(
        impostor, INDEX_CONTEXT + canonical_json(doc["signed"])).hex()}]
    with pytest.raises(SignatureError):
        Node(Replaying(client.url, http, forged), base=node.base, cache_dir=tmp_path / "other-cache",
             registry_key=old_pin).pull()
