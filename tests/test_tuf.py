"""The library's TUF metadata (python-tuf) through the node: a stock ngclient works, refreshes are
incremental, and the TUF attacks (rollback, freeze, mix-and-match, hash mismatch, endless data,
a root rotation below threshold) are refused."""

from __future__ import annotations

import copy
import json
import random
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, SuccinctRoles, Timestamp

import bundle_factory
from semla.registry import keys
from semla.registry.bundle import read_bundle
from semla.registry.http import RegistryClient
from semla.registry.node import Node
from semla.registry.tufindex import BoundedFetcher, bin_for, by_name_version, spliced_list
from semla.schemas import AdapterSummary, revocation_payload
from semla.schemas.errors import SignatureError, VerificationError
from semla.server import ServerSettings, create_app

TOKEN = "tuf-test-token"
URL = "http://registry.test"


class Tamper:
    """An httpx transport in front of the registry app that can swap what chosen URLs answer."""

    def __init__(self, http: TestClient) -> None:
        self.http = http
        self.swap: dict[str, object] = {}  # path (or path prefix ending in /) -> bytes or callable(bytes)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        r = self.http.request(request.method, str(request.url), content=request.read())
        body = r.content
        for key, change in self.swap.items():
            if request.url.path == key or (key.endswith("/") and request.url.path.startswith(key)):
                body = change(body) if callable(change) else change
                return httpx.Response(200, content=body)
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=body)


@pytest.fixture
def registry(tmp_path, trained_bundle):
    data_dir = tmp_path / "registry"
    bundle_factory.install_base_card(data_dir)
    keys.save_keypair(keys.generate_key(), data_dir / "registry.key")  # as a registry from before TUF left it
    app = create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN))
    http = TestClient(app, base_url=URL)
    key = keys.generate_key()
    RegistryClient(URL, client=http).register_key(keys.public_bytes(key).hex(), TOKEN)
    base_files = read_bundle(trained_bundle)
    state = {"http": http, "key": key, "data_dir": data_dir, "base_files": base_files, "app": app}
    publish(state, "fog", 1)
    return state


def publish(state, name: str, version: int, *, own_centroids: bool = False) -> None:
    """The trained bundle as ``name`` ``version``; with ``own_centroids``, its centroid vectors'
    components shuffled (still unit vectors) by a seed of the name and version."""
    def change(raw: dict) -> None:
        raw["name"], raw["version"], raw["publisher"] = name, version, keys.key_id(state["key"])
        if own_centroids:
            order = random.Random(f"{name}/{version}")
            for vector in raw["centroids"]["vectors"]:
                order.shuffle(vector)

    files = bundle_factory.edit_manifest(state["base_files"], change, resign_with=state["key"])
    r = state["http"].post("/v1/adapters", files={n: (n, d) for n, d in files.items()})
    assert r.status_code == 201, r.text


def revoke(state, name: str, version: int) -> None:
    sig = keys.sign(state["key"], revocation_payload(name, version))
    RegistryClient(URL, client=state["http"]).revoke(name, version, sig)


def make_node(state, tiny_base, cache, tamper: Tamper | None = None) -> Node:
    http = httpx.Client(transport=httpx.MockTransport(tamper)) if tamper is not None else state["http"]
    return Node(RegistryClient(URL, client=http), base=copy.deepcopy(tiny_base), cache_dir=cache)


def listing(node: Node) -> list[tuple]:
    return [(a.name, a.version, a.manifest_sha256, a.centroids) for a in node.library]


def online_signer(state, role: str) -> CryptoSigner:
    return CryptoSigner(keys.load_private_key(state["data_dir"] / "tuf" / "keys" / f"{role}.key"))


def metadata(state, name: str) -> Metadata:
    return Metadata.from_bytes(state["http"].get(f"/tuf/metadata/{name}").content)


def test_bins_follow_tap15_exactly():
    roles = SuccinctRoles(keyids=[], threshold=1, bit_length=13, name_prefix="bins")
    for path in ["adapters/fog/1/manifest.json", "keys/publishers.json", "shards/7.safetensors", "a/ü/x"]:
        assert bin_for(path, 13) == roles.get_role_for_target(path)


def test_a_stock_ngclient_downloads_a_verified_adapter_file(registry, tmp_path):
    from tuf.ngclient import Updater

    http = registry["http"]
    (tmp_path / "md").mkdir()
    updater = Updater(str(tmp_path / "md"), f"{URL}/tuf/metadata/", str(tmp_path / "t"), f"{URL}/tuf/targets/",
                      fetcher=BoundedFetcher(http), bootstrap=http.get("/tuf/metadata/1.root.json").content)
    updater.refresh()
    info = updater.get_targetinfo("adapters/fog/1/adapter_model.safetensors")
    assert info is not None
    path = updater.download_target(info, str(tmp_path / "weights"))
    assert open(path, "rb").read() == registry["base_files"]["adapter_model.safetensors"]
    assert updater.get_targetinfo("adapters/nope/1/manifest.json") is None


def test_metadata_is_static_with_etags(registry):
    http = registry["http"]
    first = http.get("/tuf/metadata/timestamp.json")
    assert first.status_code == 200 and "must-revalidate" in first.headers["cache-control"]
    again = http.get("/tuf/metadata/timestamp.json", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert http.get("/tuf/metadata/timestamp.json").content == first.content  # not re-signed per request
    snap = http.get(f"/tuf/metadata/{Metadata.from_bytes(first.content).signed.snapshot_meta.version}.snapshot.json")
    assert "immutable" in snap.headers["cache-control"]
    assert http.get("/tuf/metadata/..%2Fkeys%2Ftimestamp.key").status_code == 404


def test_node_refresh_downloads_only_what_changed_and_revocations_propagate(registry, tiny_base, tmp_path):
    node = make_node(registry, tiny_base, tmp_path / "cache")
    assert [a.name for a in node.pull()] == ["fog"]
    fetcher = node._index.fetcher
    cold = fetcher.bytes_downloaded
    publish(registry, "rain", 1)
    before = fetcher.bytes_downloaded
    assert sorted(a.name for a in node.pull()) == ["fog", "rain"]
    refresh = fetcher.bytes_downloaded - before
    assert 0 < refresh < cold + 64 * 1024  # timestamp, snapshot, the touched bins and one shard
    before = fetcher.bytes_downloaded
    node.pull()  # nothing changed: the timestamp only
    assert fetcher.bytes_downloaded - before < 4096
    revoke(registry, "rain", 1)
    assert [a.name for a in node.pull()] == ["fog"]
    assert set(node.trusted_keys) == {keys.key_id(registry["key"])}


@pytest.mark.slow
@pytest.mark.ci_slow  # a sync with an Updater per bin, walked twice (~35 s): CI runs it in make test-slow
def test_sync_walks_bins_in_batches_and_again_when_the_snapshot_moves(registry, tiny_base, tmp_path, monkeypatch):
    """A fresh Updater after every BIN_BATCH bins it loaded (ngclient keeps every role it loaded);
    a publish between two batches makes the walk begin again, so no sync mixes two snapshots."""
    from semla.registry import tufindex

    publish(registry, "rain", 1)
    monkeypatch.setattr(tufindex, "BIN_BATCH", 1)
    updaters = []
    real = tufindex.TufIndex._updater

    def counted(index):
        updaters.append(1)
        if len(updaters) == 2:  # between the first and the second bin of the first walk
            publish(registry, "snow", 1)
        return real(index)

    walks = []
    real_walk = tufindex.TufIndex._walk
    monkeypatch.setattr(tufindex.TufIndex, "_updater", counted)
    monkeypatch.setattr(tufindex.TufIndex, "_walk", lambda index, known: walks.append(real_walk(index, known))
                        or walks[-1])
    node = make_node(registry, tiny_base, tmp_path / "batched")
    assert sorted(a.name for a in node.pull()) == ["fog", "rain", "snow"]
    assert [w is None for w in walks] == [True, False]  # the first walk saw the snapshot move
    assert len(updaters) >= 4  # one updater per loaded bin
    updaters.clear()
    node.pull()  # nothing changed: one updater, no bin loaded
    assert len(updaters) == 1
    cold = make_node(registry, tiny_base, tmp_path / "cold")
    monkeypatch.setattr(tufindex.TufIndex, "_updater", real)
    cold.pull()
    assert listing(node) == listing(cold)


@pytest.mark.parametrize("seed", range(5))
def test_a_spliced_list_equals_the_list_filtered_and_sorted(seed):
    """spliced_list (bisection) gives what filtering out ``gone`` by identity and sorting in
    ``came`` gives, with re-listed adapters, names listed twice, and gone objects never held."""
    rng = random.Random(seed)

    def summary(name: str, version: int) -> AdapterSummary:
        return AdapterSummary(name=name, version=version, publisher="0" * 16, base_fingerprint="f" * 64,
                              domain="d", sample_count=64, manifest_sha256="0" * 64, centroids=[[1.0, 0.0]],
                              created_at="2026-01-01T00:00:00Z")

    names = [f"a{i:03d}" for i in range(40)]
    held = sorted((summary(rng.choice(names), rng.randint(1, 3)) for _ in range(60)), key=by_name_version)
    gone = rng.sample(held, 15) + [summary("a000", 1)]  # the last one is not held (an equal copy is not it)
    relisted = [a.model_copy() for a in gone[:5]]
    came = sorted(relisted + [summary(rng.choice(names) + "x", 1) for _ in range(6)], key=by_name_version)
    got, removed, at = spliced_list(held, gone, came)
    ids = {id(a) for a in gone}
    assert got == sorted([a for a in held if id(a) not in ids] + came, key=by_name_version)
    assert len(got) == len(held) - 15 + len(came)
    assert removed == sorted(i for i, a in enumerate(held) if id(a) in ids)
    kept = [a for a in held if id(a) not in ids]
    assert [x for x in got if any(x is k for k in kept)] == kept  # the kept objects themselves, in order
    assert len(at) == len(came) and at == sorted(at)


@pytest.mark.slow
@pytest.mark.ci_slow  # 14 publishes and revocations, a cold node after each: CI runs it in make test-slow
def test_incremental_refresh_equals_a_cold_start(registry, tiny_base, tmp_path):
    """After each change the warm node's library and its centroid table (spliced, not rebuilt,
    from the index's change alone) equal a cold node's."""
    rng = random.Random(12)
    node = make_node(registry, tiny_base, tmp_path / "warm")
    node.pull()
    # From now on every pull follows the index's change; none passes over the whole list.
    node._listed = lambda everything: pytest.fail("a refresh passed over the whole library")
    live: dict[str, set[int]] = {"fog": {1}}  # name -> its live versions (a revoked newest one uncovers the last)
    latest: dict[str, int] = {"fog": 1}
    for step in range(14):
        if live and rng.random() < 0.35:
            name = rng.choice(sorted(live))
            newest = max(live[name])
            revoke(registry, name, newest)
            live[name].discard(newest)
            if not live[name]:
                del live[name]
        else:
            name = rng.choice(["fog", "rain", "snow", "dusk", "glare"])
            latest[name] = latest.get(name, 0) + 1
            publish(registry, name, latest[name], own_centroids=True)  # a table in another order would differ
            live.setdefault(name, set()).add(latest[name])
        if live:
            node.pull()
            cold = make_node(registry, tiny_base, tmp_path / f"cold{step}")
            cold.pull()
            assert listing(node) == listing(cold), step
            assert {(a.name, a.version) for a in node.library} == {(n, max(v)) for n, v in live.items()}
            warm_table, cold_table = node._table, cold._table
            assert np.array_equal(warm_table.vectors, cold_table.vectors) and np.array_equal(warm_table.owner, cold_table.owner)
            assert np.array_equal(warm_table.spread, cold_table.spread, equal_nan=True)
    # Nothing changed: the index hands back the same list, and the node keeps its library and
    # table without walking them.
    listed, table, library = node._tuf_index().library(), node._table, node.library
    node._applied = lambda *args: pytest.fail("a pull with nothing changed walked the library")
    assert node.pull() is library
    assert node._tuf_index().library() is listed and node._table is table


def test_rollback_of_the_timestamp_is_refused(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    node.pull()
    old = registry["http"].get("/tuf/metadata/timestamp.json").content
    publish(registry, "rain", 1)
    node.pull()
    tamper.swap["/tuf/metadata/timestamp.json"] = old
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "rollback"
    assert sorted(a.name for a in node.library) == ["fog", "rain"]  # nothing replaced


def _signed_timestamp(state, *, snapshot_version: int, expires: datetime | None = None) -> bytes:
    """A timestamp signed by the registry's (compromised) online timestamp key."""
    current = metadata(state, "timestamp.json").signed
    ts = Timestamp(version=current.version + 1, expires=expires or current.expires,
                   snapshot_meta=type(current.snapshot_meta)(version=snapshot_version))
    md = Metadata(ts)
    md.sign(online_signer(state, "timestamp"))
    return md.to_bytes()


def test_rollback_of_the_snapshot_is_refused_even_with_the_timestamp_key(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    publish(registry, "rain", 1)
    node.pull()
    current = metadata(registry, "timestamp.json").signed.snapshot_meta.version
    tamper.swap["/tuf/metadata/timestamp.json"] = _signed_timestamp(registry, snapshot_version=current - 1)
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "rollback"


def test_rollback_of_a_bin_is_refused_even_with_the_online_keys(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    publish(registry, "rain", 2)
    node.pull()
    version = metadata(registry, "timestamp.json").signed.snapshot_meta.version
    snap = metadata(registry, f"{version}.snapshot.json")
    name, meta = next((n, m) for n, m in snap.signed.meta.items() if n.startswith("bins-") and m.version > 1)
    meta.version -= 1  # point at the bin's previous version
    snap.signed.version += 1
    snap.sign(online_signer(registry, "snapshot"))
    data = snap.to_bytes()
    tamper.swap[f"/tuf/metadata/{version + 1}.snapshot.json"] = data
    ts = metadata(registry, "timestamp.json")
    ts.signed.version += 1
    ts.signed.snapshot_meta = type(ts.signed.snapshot_meta)(version=version + 1)
    ts.sign(online_signer(registry, "timestamp"))
    tamper.swap["/tuf/metadata/timestamp.json"] = ts.to_bytes()
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "rollback", name


def test_a_bin_from_another_snapshot_is_refused(registry, tiny_base, tmp_path):
    """Mix-and-match: the bin the snapshot names, answered with that bin's previous version."""
    tamper = Tamper(registry["http"])
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    publish(registry, "rain", 1)
    version = metadata(registry, "timestamp.json").signed.snapshot_meta.version
    snap = metadata(registry, f"{version}.snapshot.json").signed
    name, meta = next((n[:-5], m.version) for n, m in snap.meta.items() if n.startswith("bins-") and m.version > 2
                      ) if any(n.startswith("bins-") and m.version > 2 for n, m in snap.meta.items()) else (None, None)
    if name is None:  # make one bin reach version 3: publish and revoke in it
        revoke(registry, "rain", 1)
        publish(registry, "rain", 2)
        version = metadata(registry, "timestamp.json").signed.snapshot_meta.version
        snap = metadata(registry, f"{version}.snapshot.json").signed
        name, meta = next((n[:-5], m.version) for n, m in snap.meta.items() if n.startswith("bins-") and m.version > 2)
    older = registry["http"].get(f"/tuf/metadata/{meta - 1}.{name}.json").content
    tamper.swap[f"/tuf/metadata/{meta}.{name}.json"] = older
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "rollback"


def test_an_expired_timestamp_is_refused(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    node.pull()
    current = metadata(registry, "timestamp.json").signed.snapshot_meta.version
    past = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)
    tamper.swap["/tuf/metadata/timestamp.json"] = _signed_timestamp(registry, snapshot_version=current, expires=past)
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "index_expired"


def test_a_shard_whose_hash_does_not_match_is_refused(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    tamper.swap["/tuf/targets/shards/"] = lambda body: body[:-1] + bytes([body[-1] ^ 1])
    with pytest.raises(VerificationError) as info:
        make_node(registry, tiny_base, tmp_path / "cache", tamper).pull()
    assert info.value.code == "hash_mismatch"


def test_endless_data_is_cut_at_the_recorded_length(registry, tiny_base, tmp_path):
    tamper = Tamper(registry["http"])
    tamper.swap["/tuf/targets/shards/"] = lambda body: body + b"\0" * (4 << 20)
    node = make_node(registry, tiny_base, tmp_path / "cache", tamper)
    with pytest.raises(VerificationError) as info:
        node.pull()
    assert info.value.code == "too_long"
    assert node._index.fetcher.bytes_downloaded < 2 << 20  # stopped reading early


def test_a_root_rotation_signed_below_threshold_is_refused(registry, tiny_base, tmp_path):
    from semla.server.tufrepo import TufRepository

    node = make_node(registry, tiny_base, tmp_path / "cache")
    node.pull()
    repo = TufRepository(registry["data_dir"] / "tuf")
    old_root = keys.load_private_key(registry["data_dir"] / "tuf" / "root-keys" / "root-1.key")
    new_roots = [keys.generate_key() for _ in range(3)]
    version = repo.rotate_root([old_root], new_roots, 2)  # properly signed: 1 of 1 old, 2 of 3 new
    node.pull()
    assert json.loads((node._index.directory / "metadata" / "root.json").read_bytes())["signed"]["version"] == version
    forged = Metadata.from_bytes((repo.metadata_dir / f"{version}.root.json").read_bytes())
    forged.signed.version = version + 1
    forged.signatures.clear()
    forged.sign(CryptoSigner(new_roots[0]))  # one of the two signatures the root needs
    (repo.metadata_dir / f"{version + 1}.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(SignatureError) as info:
        node.pull()
    assert info.value.code == "tuf_signature"


def test_a_node_pinned_to_the_old_registry_key_accepts_only_a_root_it_signed(registry, tiny_base, tmp_path):
    legacy = keys.load_private_key(registry["data_dir"] / "registry.key")
    node = make_node(registry, tiny_base, tmp_path / "c1")
    node.registry_key = keys.public_bytes(legacy)
    assert [a.name for a in node.pull()] == ["fog"]
    wrong = make_node(registry, tiny_base, tmp_path / "c2")
    wrong.registry_key = keys.public_bytes(keys.generate_key())
    with pytest.raises(SignatureError) as info:
        wrong.pull()
    assert info.value.code == "registry_key"


def test_two_replicas_publishing_concurrently_write_strictly_increasing_metadata(registry, tmp_path):
    second = TestClient(create_app(ServerSettings(data_dir=registry["data_dir"], admin_token=TOKEN)), base_url=URL)
    publish_concurrently_and_check(registry, second, tmp_path)


def test_two_replicas_on_postgres_write_strictly_increasing_metadata(pg_url, trained_bundle, tmp_path):
    """The same on one PostgreSQL database: the publish advisory lock orders the writers."""
    from semla.server.db import upgrade

    upgrade(pg_url)
    data_dir = tmp_path / "registry"
    bundle_factory.install_base_card(data_dir)
    settings = ServerSettings(data_dir=data_dir, database_url=pg_url, admin_token=TOKEN)
    first, second = (TestClient(create_app(settings), base_url=URL) for _ in range(2))
    key = keys.generate_key()
    RegistryClient(URL, client=first).register_key(keys.public_bytes(key).hex(), TOKEN)
    state = {"http": first, "key": key, "data_dir": data_dir, "base_files": read_bundle(trained_bundle)}
    publish_concurrently_and_check(state, second, tmp_path)


def publish_concurrently_and_check(registry, second: TestClient, tmp_path) -> None:
    """Two replicas publish three adapters each at once; the snapshot versions form an unbroken
    increasing run and a stock ngclient finds every adapter through the second replica."""
    import threading

    replicas = [registry["http"], second]
    errors = []
    before = {int(p.name.split(".")[0]) for p in (registry["data_dir"] / "tuf" / "metadata").glob("*.snapshot.json")}

    def run(i: int) -> None:
        try:
            for j in range(3):
                publish({**registry, "http": replicas[i]}, f"r{i}-{j}", 1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    meta_dir = registry["data_dir"] / "tuf" / "metadata"
    versions = sorted(int(p.name.split(".")[0]) for p in meta_dir.glob("*.snapshot.json"))
    assert versions == list(range(versions[0], versions[-1] + 1))
    assert versions[-1] >= max(before) + 6  # one new snapshot per publish, none lost
    from tuf.ngclient import Updater

    (tmp_path / "md").mkdir()
    updater = Updater(str(tmp_path / "md"), f"{URL}/tuf/metadata/", str(tmp_path / "t"), f"{URL}/tuf/targets/",
                      fetcher=BoundedFetcher(second), bootstrap=second.get("/tuf/metadata/1.root.json").content)
    for i in range(2):
        for j in range(3):
            assert updater.get_targetinfo(f"adapters/r{i}-{j}/1/manifest.json") is not None


def _summaries(n: int, dim: int = 8) -> list:
    from semla.schemas import AdapterSummary

    rng = random.Random(n)
    return [AdapterSummary(name=f"a-{i:04d}", version=1 + i % 3, publisher=f"{i % 3:016x}", base_fingerprint="b" * 64,
                           domain=f"domain {i} \u00e9", sample_count=100 + i, manifest_sha256=f"{i:064x}",
                           centroids=[[rng.uniform(-1, 1) for _ in range(dim)] for _ in range(1 + i % 2)],
                           created_at=f"2026-0{1 + i % 9}-1{i % 10}T0{i % 10}:3{i % 10}:0{i % 10}Z",
                           spread=None if i % 2 else [0.1, 0.2, 0.3]) for i in range(n)]


def test_shards_round_trip_and_version_1_still_reads():
    """A shard lists the summaries exactly (centroids as float32); a version-1 shard, as registries
    wrote them before, still decodes to the same; version 2 is much smaller."""
    import numpy as np
    from safetensors.numpy import save

    from semla.registry.tufindex import decode_shard, encode_shard

    summaries = _summaries(120, dim=64)
    as_f32 = [s.model_copy(update={"centroids": np.asarray(s.centroids, np.float32).tolist()}) for s in summaries]
    v2 = encode_shard(summaries)
    assert decode_shard(v2) == sorted(as_f32, key=lambda a: (a.name, a.version))
    fields = ["name", "version", "publisher", "base_fingerprint", "domain", "sample_count", "manifest_sha256",
              "created_at", "spread"]
    vectors = [(i, c) for i, s in enumerate(summaries) for c in s.centroids]
    v1 = save({"centroids.64": np.asarray([c for _, c in vectors], np.float32),
               "owner.64": np.asarray([i for i, _ in vectors], np.int64)},
              metadata={"format": "semla-shard-v1", "fields": json.dumps(fields),
                        "adapters": json.dumps([[getattr(s, f) for f in fields] for s in summaries])})
    assert decode_shard(v1) == as_f32
    raw = sum(len(s.centroids) for s in summaries) * 64 * 4
    assert len(v2) < 1.45 * raw < len(v1)


@pytest.mark.parametrize("tamper", ["publisher index", "hash rows", "bool index", "short item"])
def test_a_malformed_version_2_shard_is_refused(tamper):
    from safetensors.numpy import load, save

    from semla.registry.tufindex import decode_shard, encode_shard

    data = encode_shard(_summaries(4))
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta, tensors = header["__metadata__"], load(data)
    listing = json.loads(meta["adapters"])
    if tamper == "publisher index":
        listing[0][2] = 99
    elif tamper == "bool index":
        listing[0][3] = True
    elif tamper == "short item":
        listing[1] = listing[1][:5]
    else:
        tensors["manifest_sha256"] = tensors["manifest_sha256"][:2]
    meta["adapters"] = json.dumps(listing)
    with pytest.raises(VerificationError, match="shard is invalid"):
        decode_shard(save(tensors, metadata=meta))
