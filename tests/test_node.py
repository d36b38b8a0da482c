"""The inference node: verified cache tiers, offline serving, revocation, both fusion paths."""

from __future__ import annotations

import copy
import shutil

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from semla.client import publish_bundle
from semla.registry import keys, synth
from semla.registry.cache import CacheLimits
from semla.registry.http import RegistryClient
from semla.registry.node import Node, Retrieval
from semla.schemas import ADAPTER_WEIGHTS_FILE
from semla.schemas.errors import IndexExpiredError, InvalidInputError, NotFoundError, RegistryError
from semla.server import ServerSettings, create_app

TOKEN = "node-test-token"
CLASSES = list(synth.STREET_CLASSES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fog_night_library):
    """An in-process registry holding two published adapters (fog, night), one key each."""
    root = tmp_path_factory.mktemp("node")
    app = create_app(ServerSettings(data_dir=root / "registry", admin_token=TOKEN))
    http = TestClient(app, base_url="http://registry.test")
    client = RegistryClient("http://registry.test", client=http)
    for domain, bundle in fog_night_library.items():
        key = keys.generate_key()
        client.register_key(keys.public_bytes(key).hex(), TOKEN)
        publish_bundle(shutil.copytree(bundle, root / domain), client, key=key)  # the shared bundles stay unsigned
    return client


def unreachable() -> RegistryClient:
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    return RegistryClient("http://registry.test", client=httpx.Client(transport=httpx.MockTransport(refuse)))


@pytest.fixture
def images():
    return [synth.render(d, 777, i)[0] for d in ("fog", "night") for i in range(2)]


def make_node(registry, fresh_base, tmp_path, **kwargs) -> Node:
    node = Node(registry, base=fresh_base, cache_dir=tmp_path / "cache", **kwargs)
    node.pull()
    return node


def test_downloads_once_then_hits_memory_then_disk(registry, tiny_base, fresh_base, tmp_path, images):
    node = make_node(registry, fresh_base, tmp_path)
    first = node.segment(images, CLASSES, top_k=2)
    assert node.cache.stats["downloads"] == 2
    again = node.segment(images, CLASSES, top_k=2)
    assert node.cache.stats["downloads"] == 2 and node.cache.stats["host_hits"] >= 2
    assert all((a.mask == b.mask).all() for a, b in zip(first, again))

    restarted = make_node(registry, copy.deepcopy(tiny_base), tmp_path)  # same disk cache
    third = restarted.segment(images, CLASSES, top_k=2)
    assert restarted.cache.stats["downloads"] == 0 and restarted.cache.stats["disk_hits"] == 2
    assert all((a.mask == b.mask).all() for a, b in zip(first, third))
    assert [c.name for c in first[0].contributions] == ["fog", "night"]  # a fog image retrieves fog first


def test_tampered_disk_entry_is_rejected_and_fetched_again(registry, tiny_base, fresh_base, tmp_path, images):
    make_node(registry, fresh_base, tmp_path).segment(images[:1], CLASSES, top_k=1)
    (cached,) = (tmp_path / "cache" / "bundles").rglob(ADAPTER_WEIGHTS_FILE)
    data = bytearray(cached.read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    node = make_node(registry, copy.deepcopy(tiny_base), tmp_path)
    node.segment(images[:1], CLASSES, top_k=1)
    assert node.cache.stats["disk_rejected"] == 1 and node.cache.stats["downloads"] == 1
    assert cached.read_bytes() != bytes(data)  # replaced by the verified download


def test_cache_never_exceeds_its_budget(registry, fresh_base, tmp_path, images):
    probe = make_node(registry, fresh_base, tmp_path / "probe")
    probe.segment(images[:1], CLASSES, top_k=1)
    one = probe.cache.usage()["host_bytes"]
    node = make_node(registry, probe.base, tmp_path, limits=CacheLimits(host_bytes=int(one * 1.5)))
    node.segment(images[:2], CLASSES, top_k=1)  # fog only
    node.segment(images[2:], CLASSES, top_k=1)  # night only: fog is evicted
    assert node.cache.usage()["host_bytes"] <= int(one * 1.5)
    assert node.cache.stats["host_evictions"] >= 1
    with pytest.raises(InvalidInputError, match="budget"):
        node.segment(images, CLASSES, top_k=2)  # one batch needing both cannot fit


def test_adapters_leaving_the_library_are_dropped_everywhere(registry, fresh_base, tmp_path, images):
    node = make_node(registry, fresh_base, tmp_path)
    node.segment(images, CLASSES, top_k=2)
    keep = [a for a in node.library if a.name == "fog"]
    dropped = node.cache.retain(keep)
    assert dropped == ["night@1"]
    assert list(node.cache.host.entries) == ["fog@1"]
    assert [p.parent.name for p in (tmp_path / "cache" / "bundles").glob("*/*")] == ["fog"]


def test_offline_serving_from_the_last_index_until_it_expires(registry, tiny_base, fresh_base, tmp_path, images):
    online = make_node(registry, fresh_base, tmp_path)
    expected = online.segment(images, CLASSES, top_k=2)

    offline = Node(unreachable(), base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    offline.pull()
    assert offline.offline and offline.health()["status"] == "offline"
    got = offline.segment(images, CLASSES, top_k=2)
    assert all((a.mask == b.mask).all() for a, b in zip(expected, got))

    offline.max_index_age = 0.0
    assert offline.health()["status"] == "expired"
    with pytest.raises(IndexExpiredError) as info:
        offline.segment(images, CLASSES)
    assert info.value.code == "index_expired"


def test_unreachable_registry_without_a_cached_index(fresh_base, tmp_path):
    node = Node(unreachable(), base=fresh_base, cache_dir=tmp_path / "empty")
    with pytest.raises(RegistryError, match="no earlier index"):
        node.pull()


def test_merged_path_equals_mixture_and_is_kept_while_the_vector_repeats(registry, fresh_base, tmp_path, images):
    node = make_node(registry, fresh_base, tmp_path)
    pixels, _ = node.embed(images)
    before = node.fused_dense(pixels, None)
    n = len(images)
    shared = Retrieval(torch.tensor([[0, 1]] * n), torch.zeros(n, 2), torch.tensor([[0.7, 0.3]] * n))
    merged = node.fused_dense(pixels, shared)
    key = node.engine._merged_key
    assert key is not None
    node.fused_dense(pixels, shared)
    assert node.engine._merged_key is key  # not re-merged
    adapters = node.cache.get_many(node.library)
    node.engine.unmerge()
    node.engine.set_mixture(adapters, torch.tensor([[0.7, 0.3]] * n))
    mixture = node.base.encode_dense(pixels)
    node.engine.clear()
    assert (merged - mixture).abs().max() <= 1e-5
    node.fused_dense(pixels, shared)
    after = node.fused_dense(pixels, None)  # back to the base: merged weights restored bit-exactly
    assert node.engine._merged_key is None
    assert torch.equal(after, before)


def test_pinned_adapter_and_per_image_vocabularies(registry, fresh_base, tmp_path, images):
    node = make_node(registry, fresh_base, tmp_path)
    preds = node.segment(images[:2], [CLASSES, ["sky", "road"]], adapter="night")
    assert [c.name for c in preds[0].contributions] == ["night"] and preds[0].contributions[0].weight == 1.0
    assert preds[1].classes == ["sky", "road"] and preds[1].mask.max() <= 1
    with pytest.raises(NotFoundError, match="fog, night"):
        node.segment(images[:1], CLASSES, adapter="rain")
    with pytest.raises(InvalidInputError):
        node.segment(images[:2], [CLASSES])


def test_an_old_index_is_refreshed_when_the_registry_answers(registry, fresh_base, tmp_path, images):
    node = make_node(registry, fresh_base, tmp_path, max_index_age=60.0)
    node.index_time -= 120.0  # the node has not pulled for two minutes
    assert node.health()["status"] == "expired"
    node.segment(images[:1], CLASSES, top_k=1)
    assert node.index_age() < 60.0 and node.health()["status"] == "ok"


def test_a_revoked_adapter_vanishes_from_retrieval_and_the_cache(tiny_base, fog_night_library, tmp_path, images):
    from semla.schemas import revocation_payload

    root = tmp_path / "own"  # a registry of its own: revocation must not leak into other tests
    app = create_app(ServerSettings(data_dir=root / "registry", admin_token=TOKEN))
    client = RegistryClient("http://own.test", client=TestClient(app, base_url="http://own.test"))
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    for domain, bundle in fog_night_library.items():
        publish_bundle(shutil.copytree(bundle, root / domain), client, key=key)
    node = Node(client, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
    node.pull()
    node.segment(images, CLASSES, top_k=2)
    assert sorted(node.cache.host.entries) == ["fog@1", "night@1"]

    client.revoke("night", 1, keys.sign(key, revocation_payload("night", 1)))
    node.pull()
    assert [a.name for a in node.library] == ["fog"]
    assert list(node.cache.host.entries) == ["fog@1"]
    assert [p.parent.name for p in (tmp_path / "cache" / "bundles").glob("*/*")] == ["fog"]
    preds = node.segment(images, CLASSES, top_k=5)
    assert {c.name for p in preds for c in p.contributions} == {"fog"}
