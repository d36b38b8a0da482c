"""The registry at scale: 10k, 100k and 1M synthetic signed adapters (SQLite), 100k on PostgreSQL.

For each library size and database it bulk-loads N synthetic signed adapters, starts
``semla-server`` on loopback and measures, in one run:

* **reads**: req/s, p50 and p99 of each read endpoint beside ``GET /healthz`` under the same
  concurrent load: one adapter (``GET /v1/adapters/{name}``), one page of the listing (``GET
  /v1/adapters?limit=100&cursor=...`` at a random place), a manifest, ``POST /v1/retrieve``, and
  the TUF static metadata (``GET /tuf/metadata/timestamp.json``, measured once the server serves
  it); each with its share of ``/healthz``'s req/s and whether it meets the goal (>= 50 %, p99
  under 50 ms). The endpoints take turns in interleaved rounds (``READ_ROUNDS``), and each row
  also gives the server process's CPU per request (what an endpoint costs the server, whatever
  else runs; on a shared machine the speed drifts by a third between minutes) and the whole
  machine's busy CPU per request (client, server and PostgreSQL together; meaningful only when
  nothing else runs). The load generator's own heap is frozen out of its garbage collector while
  it measures, so its collections do not stall its client threads and count as slow answers;
* **publish**: latency p50/p99 of real signed uploads (``POST /v1/adapters``, full verification)
  into the full library, one after another;
* **node sync**: bytes and time of a node's cold start and of its refresh after 1, 100 and
  10,000 new adapters (``--refresh-counts``), each through a :class:`~semla.registry.tufindex.TufIndex`
  (``tuf.ngclient``) against the running server, the bytes counted at its fetcher by kind
  (metadata, shards, the key list); the cold start's bytes beside the raw centroid bytes
  (adapters × D × 4) and the metadata it had to read (the goal: at most 1.5×). The new adapters
  are real signed uploads (``POST /v1/adapters``), published before each refresh's clock starts.

How the library is filled (fast, and still signed): ``n_keys`` Ed25519 publisher keys (one per
250 adapters, at least 4); one manifest template validated by the ``Manifest`` schema and
encoded canonically, then per adapter its name, publisher, domain and ``--dim``-d unit centroid
spliced into the template's canonical bytes (checked byte-identical to
``Manifest.to_canonical()`` every 10,000th adapter) and signed; manifest and signature written as
content-addressed blobs where the ``BlobStore`` keeps them; the LoRA weights and config are one
shared blob each (identical files are stored once). ``--workers`` processes do that, 5,000
adapters a batch, while the main process inserts each batch through the registry's ORM tables;
the library version is raised by one per key and per adapter, as if each had been registered
and published; then ``ANALYZE`` (a bulk load leaves the planner without statistics, which a
live database's autovacuum keeps; PostgreSQL plans a listing page as a scan of the whole table
without them). A base card whose embedding is ``--dim``-d is installed. Last, the TUF repository
is built from the database as the server's first start would build it
(:func:`~semla.server.tufsync.ensure_repository`: one root key, then ``TufSync.rebuild``, every
bin and shard signed and written), timed on its own.

    python benchmarks/index_scale.py                          # 10k, 100k, 1M SQLite; 100k PostgreSQL
    python benchmarks/index_scale.py --sizes 10k --pg-sizes 10k
    python benchmarks/index_scale.py --quick                  # 1k adapters, SQLite, a few requests

Results: benchmarks/results/index_scale.json (``--quick``: a temporary file unless ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, text, update

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bundle_factory  # noqa: E402
from server_load import TOKEN, drive, start_server, timed_calls  # noqa: E402

from semla.registry import keys  # noqa: E402
from semla.registry.asgi import frozen_heap  # noqa: E402
from semla.registry.bundle import sha256_bytes  # noqa: E402
from semla.registry.tufindex import BoundedFetcher, TufIndex  # noqa: E402
from semla.schemas import (  # noqa: E402
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    SIGNING_CONTEXT,
    Manifest,
    canonical_json,
)
from semla.schemas.basecard import EmbeddingSpec  # noqa: E402
from semla.server.bases import BaseCardStore  # noqa: E402
from semla.server.db import (  # noqa: E402
    Adapter,
    AdapterFile,
    LibraryVersion,
    Publisher,
    library_version_select,
    make_engine,
    make_sessionmaker,
    upgrade,
)
from semla.server.paging import adapters_scope, encode_cursor  # noqa: E402
from semla.server.service.library import with_summary  # noqa: E402
from semla.server.tufsync import ensure_repository  # noqa: E402

EMBEDDING = "bench-clip"
#: Adapters per synthetic publisher key.
ADAPTERS_PER_KEY = 250
BATCH = 5000
#: The TUF static metadata a node polls first on every refresh (a read endpoint like the others).
TUF_METADATA_PATH = "/tuf/metadata/timestamp.json"
#: How many new adapters each measured refresh follows (``--refresh-counts``).
REFRESH_COUNTS = (1, 100, 10_000)


def node_sync_rows(counts: tuple[int, ...] = REFRESH_COUNTS) -> dict[str, str]:
    """The node-sync rows, in order: what each measures."""
    rows = {"cold_start": "a node with an empty cache syncs the whole library"}
    for k in counts:
        rows[f"refresh_after_{k}"] = f"a synced node refreshes after {k:,} new adapter{'' if k == 1 else 's'}"
    return rows


NODE_SYNC_ROWS = node_sync_rows()
#: The goals of issue 12 this benchmark checks.
GOALS = {"read_share_of_healthz_min": 0.5, "read_p99_ms_max": 50.0, "publish_p50_ms_max_at_1m": 200.0,
         "refresh_after_1_bytes_max_at_1m": 1_000_000, "refresh_after_1_s_max_at_1m": 2.0,
         "cold_start_payload_over_raw_centroids_max": 1.5}


@dataclass
class Library:
    """A bulk-filled registry: where it lives and what is in it."""

    backend: str
    url: str
    data_dir: Path
    n: int
    dim: int
    signers: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    template: dict = field(default_factory=dict)
    files_meta: dict = field(default_factory=dict)
    weights: bytes = b""
    config: bytes = b""
    published: int = 0
    bulk_added: int = 0


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10k, 100k, 1M)") from None
    if value < 10:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 10 adapters")
    return value


def _sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text!r} (e.g. 1,100,10000)") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("counts must be positive")
    return counts


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> list[list[float]]:
    vectors = rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.tolist()


#: Placeholders spliced into the canonical manifest template (JSON-escaped control characters,
#: which no real value holds).
_SLOTS = {"name": "\x01N", "publisher": "\x01P", "domain": "\x01D", "vectors": "\x01V"}


def _template_text(template: dict) -> str:
    fields = copy.deepcopy(template)
    fields.update(name=_SLOTS["name"], publisher=_SLOTS["publisher"], domain=_SLOTS["domain"])
    fields["centroids"] = {"embedding_model": EMBEDDING, "vectors": _SLOTS["vectors"]}
    return canonical_json(fields).decode("utf-8")


def _splice(template_text: str, name: str, publisher: str, domain: str, vectors_json: str) -> bytes:
    """The canonical manifest bytes of one adapter: the template with its four values spliced in
    (canonical JSON's key order does not depend on the values)."""
    text = template_text
    for slot, value in ((_SLOTS["name"], json.dumps(name, ensure_ascii=False)),
                        (_SLOTS["publisher"], json.dumps(publisher)),
                        (_SLOTS["domain"], json.dumps(domain, ensure_ascii=False)),
                        (_SLOTS["vectors"], vectors_json)):
        text = text.replace(json.dumps(slot), value, 1)
    return text.encode("utf-8")


def _vectors_json(vector: list[float]) -> str:
    """``canonical_json([vector])`` for a list of finite floats."""
    return json.dumps([vector], separators=(",", ":"), allow_nan=False)


def _manifest(lib: Library, name: str, key, domain: str, vector: list[float]) -> tuple[bytes, bytes]:
    """(canonical manifest bytes, signature) of one synthetic adapter."""
    body = _splice(_template_text(lib.template), name, keys.key_id(key), domain, _vectors_json(vector))
    return body, keys.sign(key, SIGNING_CONTEXT + body)


def _write_blob(blob_root: Path, data: bytes) -> str:
    """Write a blob where BlobStore keeps it (no fsync, no existence check: a fresh fixture)."""
    digest = sha256_bytes(data)
    with open(os.path.join(blob_root, "sha256", digest[:2], digest), "wb") as f:
        f.write(data)
    return digest


def _make_batch(job: tuple) -> tuple[list[dict], list[dict]]:
    """Rows and file rows of adapters ``start .. start+count-1``: centroids drawn, manifests
    spliced and signed, blobs written (runs in a worker process)."""
    start, count, seed, template_text, private_keys, dim, blob_root, shared = job
    signers = [Ed25519PrivateKey.from_private_bytes(raw) for raw in private_keys]
    key_ids = [keys.key_id(k) for k in signers]
    rng = np.random.default_rng([seed, start])
    rows, files = [], []
    for j, vector in enumerate(_unit_rows(rng, count, dim)):
        i = start + j
        name, domain, who = f"adapter-{i:07d}", f"domain {i % 997}", i % len(signers)
        vectors_json = _vectors_json(vector)
        body = _splice(template_text, name, key_ids[who], domain, vectors_json)
        if i % 10_000 == 0:  # the fast path must produce exactly what the schema would
            assert Manifest.model_validate(json.loads(body)).to_canonical() == body, name
        sig = keys.sign(signers[who], SIGNING_CONTEXT + body)
        m_sha, s_sha = _write_blob(blob_root, body), _write_blob(blob_root, sig)
        rows.append(with_summary({"id": i + 1, "name": name, "version": 1, "publisher_key_id": key_ids[who],
                                  "manifest_sha256": m_sha, "base_fingerprint": bundle_factory.FINGERPRINT,
                                  "domain": domain, "sample_count": shared["sample_count"],
                                  "centroids": vectors_json}))
        for fname, sha, size in ((ADAPTER_WEIGHTS_FILE, *shared[ADAPTER_WEIGHTS_FILE]),
                                 (ADAPTER_CONFIG_FILE, *shared[ADAPTER_CONFIG_FILE]),
                                 (MANIFEST_FILE, m_sha, len(body)), (SIGNATURE_FILE, s_sha, len(sig))):
            files.append({"adapter_id": i + 1, "filename": fname, "sha256": sha, "size": size})
    return rows, files


def install_card(data_dir: Path, dim: int) -> None:
    card = bundle_factory.base_card().model_copy(update={"embedding": EmbeddingSpec(name=EMBEDDING, dim=dim)})
    BaseCardStore(data_dir / "bases").add(card.to_json())


def _library(backend: str, url: str, data_dir: Path, n: int, dim: int, n_keys: int, seed: int = 0) -> Library:
    """A library's description before its rows exist: fresh keys, the shared weights and config,
    the manifest template and the names ``adapter-0000000 ..``."""
    lib = Library(backend, url, data_dir, n, dim, signers=[keys.generate_key() for _ in range(n_keys)])
    lib.weights, lib.config = bundle_factory.lora_weights(), json.dumps(bundle_factory.adapter_config()).encode()
    lib.files_meta = {ADAPTER_WEIGHTS_FILE: {"sha256": sha256_bytes(lib.weights), "size": len(lib.weights)},
                      ADAPTER_CONFIG_FILE: {"sha256": sha256_bytes(lib.config), "size": len(lib.config)}}
    first = {**bundle_factory.manifest_fields(dim=dim), "publisher": keys.key_id(lib.signers[0]),
             "files": lib.files_meta,
             "centroids": {"embedding_model": EMBEDDING, "vectors": _unit_rows(np.random.default_rng(seed), 1, dim)}}
    lib.template = json.loads(Manifest.model_validate(first).to_canonical())
    lib.names = [f"adapter-{i:07d}" for i in range(n)]
    return lib


def reused_library(data_dir: Path, base: str) -> Library:
    """The library of a SQLite data dir an earlier ``--keep-data`` run filled, served at ``base``:
    its size and dimension from the database, and four fresh publisher keys registered through
    the admin API (the fill's private keys are not kept) to sign what this run publishes."""
    url = f"sqlite:///{data_dir / 'registry.db'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM adapters WHERE name LIKE 'adapter-%'")).scalar_one()
        published = conn.execute(text("SELECT COUNT(*) FROM adapters WHERE name LIKE 'new-%'")).scalar_one()
        first = conn.execute(text("SELECT centroids FROM adapters ORDER BY id LIMIT 1")).scalar_one_or_none()
    engine.dispose()
    if not n or first is None:
        raise SystemExit(f"{data_dir} holds no library filled by this benchmark")
    lib = _library("sqlite", url, data_dir, n, len(json.loads(first)[0]), 4)
    lib.published = published
    for key in lib.signers:
        httpx.post(base + "/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": "bench (reused)"},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120).raise_for_status()
    return lib


def bulk_fill(backend: str, url: str, data_dir: Path, n: int, dim: int, seed: int = 0,
              workers: int = 1) -> tuple[Library, dict]:
    """Fill an empty registry with ``n`` synthetic signed adapters (see the module docstring);
    ``workers`` processes sign and write blobs while this one inserts rows."""
    t0 = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    install_card(data_dir, dim)
    engine = make_engine(url)
    n_keys = max(4, n // ADAPTERS_PER_KEY)
    lib = _library(backend, url, data_dir, n, dim, n_keys, seed)
    blob_root = data_dir / "blobs"
    for prefix in range(256):
        (blob_root / "sha256" / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
    w_sha, c_sha = _write_blob(blob_root, lib.weights), _write_blob(blob_root, lib.config)
    with engine.begin() as conn:
        conn.execute(insert(Publisher), [{"key_id": keys.key_id(k), "public_key": keys.public_bytes(k).hex(),
                                          "label": f"bench {i}", "active": True} for i, k in enumerate(lib.signers)])
    shared = {"sample_count": lib.template["sample_count"], ADAPTER_WEIGHTS_FILE: (w_sha, len(lib.weights)),
              ADAPTER_CONFIG_FILE: (c_sha, len(lib.config))}
    raw_keys = [k.private_bytes_raw() for k in lib.signers]
    jobs = [(start, min(BATCH, n - start), seed, _template_text(lib.template), raw_keys, dim, blob_root, shared)
            for start in range(0, n, BATCH)]
    made = insert_s = 0.0
    t_made = time.perf_counter()
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        batches = pool.map(_make_batch, jobs) if pool is not None else map(_make_batch, jobs)
        for rows, files in batches:
            t = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(insert(Adapter), rows)
                conn.execute(insert(AdapterFile), files)
            insert_s += time.perf_counter() - t
    made = time.perf_counter() - t_made - insert_s
    with engine.begin() as conn:  # as if every key had been registered and every adapter published
        conn.execute(update(LibraryVersion).values(version=LibraryVersion.version + n_keys + n))
        if engine.dialect.name == "postgresql":  # ids were given explicitly: move the sequence past them
            conn.execute(text("SELECT setval(pg_get_serial_sequence('adapters', 'id'), :n)"), {"n": n})
    with engine.begin() as conn:  # planner statistics, as autovacuum/ANALYZE keep them on a live database
        conn.execute(text("ANALYZE"))
    t_tuf = time.perf_counter()
    build_tuf(data_dir, engine)
    tuf_s = time.perf_counter() - t_tuf
    engine.dispose()
    return lib, {"seconds": round(time.perf_counter() - t0, 1), "keys": n_keys, "workers": workers,
                 "sign_and_blobs_s": round(made, 1), "insert_s": round(insert_s, 1), "tuf_build_s": round(tuf_s, 1),
                 "adapters_per_s": round(n / (time.perf_counter() - t0), 1)}


def build_tuf(data_dir: Path, engine) -> None:
    """The data dir's TUF repository, built from the database as the server's first start builds
    it: the registry key (what nodes pinned before TUF signs the first root), then
    ``ensure_repository`` (one root key; ``TufSync.rebuild``: every bin and shard signed)."""
    keys.load_or_create_key(data_dir / "registry.key")
    ensure_repository(data_dir / "tuf", make_sessionmaker(engine), legacy_key_file=data_dir / "registry.key",
                      timestamp_ttl=86400)


def bulk_add(lib: Library, k: int, workers: int = 1) -> dict:
    """Add ``k`` new signed adapters to a running registry the way the fill does (rows and blobs,
    no upload), then sync their TUF bins in one ``TufSync.changed`` call, as a second writer on
    the data dir would (under the repository's file lock); the library version rises by ``k``
    and the rows are stamped with the new version (``changed_in``), as a publish stamps them."""
    from semla.server.tufrepo import TufRepository
    from semla.server.tufsync import TufSync

    engine = make_engine(lib.url)
    with engine.connect() as conn:
        max_id = conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM adapters")).scalar_one()
    start0 = lib.n + lib.bulk_added  # names adapter-NNNNNNN past the filled ones
    shared = {"sample_count": lib.template["sample_count"],
              **{f: (m["sha256"], m["size"]) for f, m in lib.files_meta.items()}}
    raw_keys = [key.private_bytes_raw() for key in lib.signers]
    jobs = [(start, min(BATCH, start0 + k - start), 1, _template_text(lib.template), raw_keys, lib.dim,
             lib.data_dir / "blobs", shared) for start in range(start0, start0 + k, BATCH)]
    names: list[str] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for rows, files in (pool.map(_make_batch, jobs) if pool is not None else map(_make_batch, jobs)):
            shift = max_id - start0  # ids after every row the server wrote
            for row in rows:
                row["id"] += shift
            for f in files:
                f["adapter_id"] += shift
            with engine.begin() as conn:
                conn.execute(insert(Adapter), rows)
                conn.execute(insert(AdapterFile), files)
            names += [row["name"] for row in rows]
    with engine.begin() as conn:
        conn.execute(update(LibraryVersion).values(version=LibraryVersion.version + k))
        conn.execute(update(Adapter).where(Adapter.id > max_id).values(changed_in=library_version_select().scalar_subquery())
                     .execution_options(synchronize_session=False))
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT setval(pg_get_serial_sequence('adapters', 'id'), "
                              "(SELECT MAX(id) FROM adapters))"))
    inserted = time.perf_counter() - t0
    t1 = time.perf_counter()
    with make_sessionmaker(engine)() as session:
        TufSync(TufRepository(lib.data_dir / "tuf")).changed(session, names)
    synced = time.perf_counter() - t1
    engine.dispose()
    lib.bulk_added += k
    return {"how": "bulk rows + one TufSync.changed (not uploads)", "insert_s": round(inserted, 1),
            "tuf_sync_s": round(synced, 1)}


def new_bundle(lib: Library, rng: random.Random) -> dict[str, bytes]:
    """A fresh signed bundle (a new name) by one of the library's keys."""
    lib.published += 1
    key = lib.signers[rng.randrange(len(lib.signers))]
    vector = _unit_rows(np.random.default_rng(rng.getrandbits(32)), 1, lib.dim)[0]
    body, sig = _manifest(lib, f"new-{lib.published:07d}", key, "newly published", vector)
    return {ADAPTER_WEIGHTS_FILE: lib.weights, ADAPTER_CONFIG_FILE: lib.config, MANIFEST_FILE: body,
            SIGNATURE_FILE: sig}


def publish(http: httpx.Client, base: str, files: dict[str, bytes]) -> float:
    parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
    t0 = time.perf_counter()
    r = http.post(base + "/v1/adapters", files=parts)
    elapsed = time.perf_counter() - t0
    if r.status_code != 201:
        raise RuntimeError(f"publish refused: {r.status_code} {r.text[:300]}")
    return elapsed


def measure_publish(lib: Library, base: str, count: int) -> dict:
    rng = random.Random(7)
    bundles = [new_bundle(lib, rng) for _ in range(count)]  # signed before the clock starts
    with httpx.Client(timeout=120) as http:
        publish(http, base, new_bundle(lib, rng))  # warm the connection
        latencies = [publish(http, base, files) * 1000 for files in bundles]
    return {"uploads": count, "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2), "max_ms": round(max(latencies), 2)}


#: The read endpoints the goal covers (the rest of measure_reads' rows are references).
READ_GOAL_ENDPOINTS = ("one_adapter", "listing_page", "manifest", "retrieve", "tuf_metadata")
#: Rounds of the read measurement: every endpoint, ``/healthz`` included, takes its turn in each
#: round, so a share compares numbers taken a few seconds apart on a shared machine.
READ_ROUNDS = 4


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of process ``pid``, busy CPU seconds of the whole machine) so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
        machine = [int(x) for x in f.readline().split()[1:8]]
    return (int(fields[11]) + int(fields[12])) / tick, (sum(machine) - machine[3] - machine[4]) / tick


def measure_reads(lib: Library, base: str, clients: int, requests: int, server_pid: int | None = None) -> dict:
    """Each read endpoint beside ``/healthz``: ``requests`` calls over ``clients`` threads, in
    :data:`READ_ROUNDS` interleaved rounds. Per endpoint: req/s and p50/p99 over all rounds; its
    share of ``/healthz``'s req/s (the total, and the median of the per-round shares); the server
    process's CPU and the whole machine's busy CPU per request (Linux; ``server_pid``)."""
    rng = np.random.default_rng(1)
    picks = [lib.names[int(i)] for i in rng.integers(0, lib.n, 4 * requests)]
    names, pages, manifests = iter(picks), iter(picks[::-1]), iter(picks[requests:] + picks[:requests])
    scope = adapters_scope()
    queries = iter([{"embedding": v, "base_fingerprint": bundle_factory.FINGERPRINT}
                    for v in _unit_rows(rng, 2 * requests, lib.dim)])
    t0 = time.perf_counter()
    httpx.post(base + "/v1/retrieve", json=next(queries), timeout=600).raise_for_status()  # build the table
    out: dict = {"retrieve_table_build_s": round(time.perf_counter() - t0, 2), "rounds": READ_ROUNDS}
    endpoints: dict[str, Callable] = {
        "healthz": lambda h: h.get(base + "/healthz"),
        "one_adapter": lambda h: h.get(f"{base}/v1/adapters/{next(names)}"),
        "listing_page": lambda h: h.get(base + "/v1/adapters",
                                        params={"limit": 100, "cursor": encode_cursor("adapters", next(pages), scope)}),
        "manifest": lambda h: h.get(f"{base}/v1/adapters/{next(manifests)}/1/manifest"),
        "retrieve": lambda h: h.post(base + "/v1/retrieve", json=next(queries)),
        "tuf_metadata": lambda h: h.get(base + TUF_METADATA_PATH),
    }
    timestamp = httpx.get(base + TUF_METADATA_PATH, timeout=60)
    timestamp.raise_for_status()
    # A reference, not a goal: the current snapshot, static bytes of about a listing page's size
    # or more, shows what the payload alone costs beside /healthz.
    snapshot = f"{base}/tuf/metadata/{timestamp.json()['signed']['meta']['snapshot.json']['version']}.snapshot.json"
    endpoints["tuf_snapshot_reference"] = lambda h: h.get(snapshot)
    for fn in endpoints.values():
        drive(fn, clients, clients * 4)  # warm connections and caches
    per_round = max(clients, requests // READ_ROUNDS)
    latencies: dict[str, list[float]] = {name: [] for name in endpoints}
    totals = {name: [0.0, 0.0, 0.0] for name in endpoints}  # wall, server CPU, machine CPU
    rates: dict[str, list[float]] = {name: [] for name in endpoints}
    # The load generator's own heap (this process: the bulk fill, numpy, httpx, the registry's
    # modules) is frozen out of the garbage collector while it measures: a full collection of it
    # paused every client thread for ~100 ms, and the requests in flight then were counted as
    # slow answers of whichever endpoint that round measured.
    gc.collect()
    with frozen_heap():
        for _ in range(READ_ROUNDS):
            for name, fn in endpoints.items():
                before = _cpu_seconds(server_pid) if server_pid else (0.0, 0.0)
                lat, wall = timed_calls(fn, clients, per_round)
                after = _cpu_seconds(server_pid) if server_pid else (0.0, 0.0)
                latencies[name] += lat
                rates[name].append(len(lat) / wall)
                for i, value in enumerate((wall, after[0] - before[0], after[1] - before[1])):
                    totals[name][i] += value
    for name in endpoints:
        n = len(latencies[name])
        row = {"requests": n, "req_per_s": round(n / totals[name][0], 1),
               "p50_ms": round(float(np.percentile(latencies[name], 50)), 2),
               "p99_ms": round(float(np.percentile(latencies[name], 99)), 2)}
        if server_pid:
            row["server_cpu_ms_per_req"] = round(totals[name][1] / n * 1000, 3)
            row["machine_cpu_ms_per_req"] = round(totals[name][2] / n * 1000, 3)
        if name != "healthz":
            row["share_of_healthz_req_per_s"] = round(row["req_per_s"] / out["healthz"]["req_per_s"], 3)
            row["share_median_of_rounds"] = round(float(np.median(
                [r / h for r, h in zip(rates[name], rates["healthz"])])), 3)
            if name in READ_GOAL_ENDPOINTS:
                row["meets_goal"] = (row["share_of_healthz_req_per_s"] >= GOALS["read_share_of_healthz_min"]
                                     and row["p99_ms"] < GOALS["read_p99_ms_max"])
        if name in ("listing_page", "tuf_snapshot_reference"):  # what one answer weighs (the first page: full)
            url = base + "/v1/adapters?limit=100" if name == "listing_page" else snapshot
            row["bytes"] = len(httpx.get(url, timeout=60).content)
        out[name] = row
    return out


class CountingFetcher(BoundedFetcher):
    """The node's bounded fetcher, its bytes and requests tallied by kind of file."""

    KINDS = ("top_metadata", "bin_metadata", "shards", "other_targets")

    def __init__(self, client: httpx.Client) -> None:
        super().__init__(client)
        self.bytes_by_kind: Counter[str] = Counter()
        self.requests_by_kind: Counter[str] = Counter()

    @staticmethod
    def kind(url: str) -> str:
        path = httpx.URL(url).path
        if "/tuf/metadata/" in path:
            name = path.rsplit("/", 1)[1]
            return "bin_metadata" if ".bins-" in name else "top_metadata"
        return "shards" if "/tuf/targets/shards/" in path else "other_targets"

    def _chunks(self, url: str) -> Iterator[bytes]:
        kind = self.kind(url)
        self.requests_by_kind[kind] += 1
        for chunk in super()._chunks(url):
            self.bytes_by_kind[kind] += len(chunk)
            yield chunk


def _timed_refresh(index: TufIndex, fetcher: CountingFetcher, expected: int) -> dict:
    """One ``TufIndex.refresh()``: wall time, bytes and requests by kind, and a check that the node
    now lists exactly the ``expected`` adapters."""
    bytes0, requests0 = Counter(fetcher.bytes_by_kind), Counter(fetcher.requests_by_kind)
    total0 = fetcher.bytes_downloaded
    t0 = time.perf_counter()
    changed = index.refresh()
    seconds = time.perf_counter() - t0
    got = sum(len(adapters) for _, adapters in index.bins.values())
    if got != expected:
        raise RuntimeError(f"the node lists {got} adapters after its refresh, the registry {expected}")
    by_kind = {k: fetcher.bytes_by_kind[k] - bytes0[k] for k in CountingFetcher.KINDS}
    metadata = by_kind["top_metadata"] + by_kind["bin_metadata"]
    return {"bytes": fetcher.bytes_downloaded - total0, "seconds": round(seconds, 3),
            "metadata_bytes": metadata, "shard_bytes": by_kind["shards"], "other_target_bytes": by_kind["other_targets"],
            "bytes_by_kind": by_kind,
            "requests": sum(fetcher.requests_by_kind.values()) - sum(requests0.values()),
            "bins_changed": len(changed), "adapters_listed": got, "snapshot_version": index.version}


def measure_node_sync(lib: Library, base: str, workdir: Path, counts: tuple[int, ...] = REFRESH_COUNTS, *,
                      bulk_above: int = 1000, workers: int = 1,
                      on_row: Callable[[dict], None] = lambda rows: None) -> dict:
    """A node (a :class:`TufIndex` over ``tuf.ngclient``, trusting the first root on first use)
    syncs the full library from an empty cache, then refreshes after each of ``counts`` new
    adapters, added before the refresh's clock starts: real signed uploads, or above
    ``bulk_above`` the fill's bulk rows and one TUF sync (:func:`bulk_add`; each upload re-signs
    the snapshot, so 10,000 uploads one by one take longer than the rest of the run)."""
    rng = random.Random(11)
    what = node_sync_rows(counts)
    rows: dict[str, dict] = {}
    with httpx.Client(timeout=600) as client:
        index = TufIndex(client, base, workdir)
        index.fetcher = fetcher = CountingFetcher(client)
        cold = _timed_refresh(index, fetcher, lib.n + lib.published + lib.bulk_added)
        centroids = sum(len(a.centroids) for _, adapters in index.bins.values() for a in adapters)
        raw = centroids * lib.dim * 4
        payload = cold["bytes"] - cold["metadata_bytes"]
        cold.update(raw_centroid_bytes=raw, centroids=centroids,
                    over_raw_plus_metadata=round(cold["bytes"] / (raw + cold["metadata_bytes"]), 3),
                    payload_over_raw=round(payload / raw, 3),
                    goal="payload (shards, key list) <= 1.5 x the raw centroid bytes, the metadata apart",
                    meets_goal=payload <= GOALS["cold_start_payload_over_raw_centroids_max"] * raw)
        rows["cold_start"] = {"what": what["cold_start"], **cold}
        on_row(rows)
        with httpx.Client(timeout=120) as http:
            for k in counts:
                t0 = time.perf_counter()
                if k > bulk_above:
                    added = bulk_add(lib, k, workers)
                else:
                    for _ in range(k):
                        publish(http, base, new_bundle(lib, rng))
                    added = {"how": "signed uploads (POST /v1/adapters), one after another"}
                added["seconds"] = round(time.perf_counter() - t0, 1)
                name = f"refresh_after_{k}"
                row = _timed_refresh(index, fetcher, lib.n + lib.published + lib.bulk_added)
                rows[name] = {"what": what[name], "new_adapters": k, **row, "added": added}
                on_row(rows)
                print(f"  node {name}: {row['bytes']:,} B in {row['seconds']} s", flush=True)
    one = rows.get("refresh_after_1")
    if one is not None:
        one["meets_goal"] = (one["bytes"] < GOALS["refresh_after_1_bytes_max_at_1m"]
                             and one["seconds"] < GOALS["refresh_after_1_s_max_at_1m"])
    return rows


def run(backend: str, url: str | None, n: int, *, dim: int, clients: int, requests: int, publishes: int,
        workers: int, refresh_counts: tuple[int, ...] = REFRESH_COUNTS, bulk_above: int = 1000,
        keep_data: bool = False, reuse: Path | None = None,
        checkpoint: Callable[[dict], None] = lambda row: None) -> dict:
    """One library size on one database: fill (or reuse), reads, publishes, a node's sync.
    ``checkpoint`` gets the row as measured so far after each phase (a killed run keeps them)."""
    if reuse is None:
        data_dir = Path(tempfile.mkdtemp(prefix=f"semla-scale-{backend}-{n}-"))
        db_url = url or f"sqlite:///{data_dir / 'registry.db'}"
        print(f"[{backend} {n}] filling ...", flush=True)
        lib, fill = bulk_fill(backend, db_url, data_dir, n, dim, workers=workers)
        print(f"[{backend} {n}] filled in {fill['seconds']} s; starting the server", flush=True)
    else:
        data_dir, keep_data, fill = reuse, True, {"reused": "a data dir an earlier --keep-data run filled"}
        shutil.rmtree(data_dir / "node", ignore_errors=True)  # the node starts cold
    proc, base = start_server(data_dir, {"SEMLA_DATABASE_URL": url, "SEMLA_METRICS": "false"} if url
                              else {"SEMLA_METRICS": "false"})
    try:
        if reuse is not None:
            lib = reused_library(data_dir, base)
            n = lib.n
            print(f"[{backend} {n}] reusing {data_dir} ({lib.published} published before)", flush=True)
        result = {"backend": backend, "adapters": n, "fill": fill}
        checkpoint(result)
        result["read"] = measure_reads(lib, base, clients, requests, server_pid=proc.pid)
        checkpoint(result)
        print(f"[{backend} {n}] reads done; publishing", flush=True)
        result["publish"] = measure_publish(lib, base, publishes)
        checkpoint(result)
        print(f"[{backend} {n}] publish done; node sync", flush=True)
        result["node_sync"] = measure_node_sync(lib, base, data_dir / "node", refresh_counts,
                                                bulk_above=bulk_above, workers=workers,
                                                on_row=lambda rows: checkpoint({**result, "node_sync": rows}))
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def _summary_line(row: dict) -> str:
    read = row["read"]
    fill = f"fill {row['fill']['seconds']:>6.1f} s" if "seconds" in row["fill"] else "reused"
    parts = [f"{row['backend']:10s} {row['adapters']:>8d}: {fill}; "
             f"publish p50 {row['publish']['p50_ms']} ms p99 {row['publish']['p99_ms']} ms"]
    for name in ("healthz", *READ_GOAL_ENDPOINTS, "tuf_snapshot_reference"):
        r = read.get(name, {})
        if "req_per_s" in r:
            parts.append(f"{name} {r['req_per_s']} req/s p99 {r['p99_ms']} ms")
    for name, r in row.get("node_sync", {}).items():
        if "bytes" in r:
            parts.append(f"node {name} {r['bytes']:,} B {r['seconds']} s")
    return "; ".join(parts)


def _merged(old: dict, new: dict) -> dict:
    """``new`` with the rows of ``old`` it did not measure (by backend and size) and every command."""
    measured = {(r["backend"], r["adapters"]) for r in new["results"]}
    kept = [r for r in old.get("results", []) if (r["backend"], r["adapters"]) not in measured]
    commands = old.get("command", [])
    commands = [commands] if isinstance(commands, str) else list(commands)
    order = {"sqlite": 0, "postgresql": 1}
    results = sorted(kept + new["results"], key=lambda r: (r["adapters"], order.get(r["backend"], 2)))
    return {**old, **new, "command": commands + [new["command"]], "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_sizes, default=None, help="SQLite library sizes (default 10k,100k,1M)")
    parser.add_argument("--pg-sizes", type=_sizes, default=None,
                        help="PostgreSQL library sizes, each run right after SQLite's of the same size when both "
                        "are asked (default 100k; '' for none)")
    parser.add_argument("--quick", action="store_true", help="1k adapters, SQLite only, few requests (the test)")
    parser.add_argument("--dim", type=int, default=64, help="centroid dimension (default 64)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that sign and write blobs during the fill (default: cores, at most 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per read endpoint (default 800)")
    parser.add_argument("--publishes", type=int, default=None, help="uploads timed into the full library (200)")
    parser.add_argument("--refresh-counts", type=_counts, default=None,
                        help="new adapters before each measured node refresh (default 1,100,10000; --quick 1,10)")
    parser.add_argument("--bulk-above", type=int, default=1000,
                        help="refresh counts above this are added in bulk with one TUF sync, not uploaded (1000)")
    parser.add_argument("--keep-data", action="store_true", help="keep each filled data dir (deleted by default)")
    parser.add_argument("--reuse-data", type=Path, default=None, metavar="DIR",
                        help="measure the SQLite library a --keep-data run filled in DIR instead of filling one "
                        "(its size comes from DIR; --sizes and --pg-sizes are ignored); what this run adds stays")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in --out whose backend and size this run does not measure")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        sizes = args.sizes if args.sizes is not None else [1000]
        pg_sizes = args.pg_sizes if args.pg_sizes is not None else []
        requests, publishes = args.requests or 40, args.publishes or 10
        refresh_counts = args.refresh_counts or (1, 10)
        out = args.out or Path(tempfile.mkdtemp(prefix="semla-scale-")) / "index_scale.json"
    else:
        sizes = args.sizes if args.sizes is not None else [10_000, 100_000, 1_000_000]
        pg_sizes = args.pg_sizes if args.pg_sizes is not None else [100_000]
        requests, publishes = args.requests or 800, args.publishes or 200
        refresh_counts = args.refresh_counts or REFRESH_COUNTS
        out = args.out or ROOT / "benchmarks" / "results" / "index_scale.json"
    t0 = time.perf_counter()
    results: list[dict] = []
    command = ("python benchmarks/index_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    before = json.loads(out.read_text()) if args.merge and out.exists() else None
    config = {"dim": args.dim, "clients": args.clients, "requests_per_endpoint": requests, "publishes": publishes,
              "refresh_counts": list(refresh_counts), "bulk_above": args.bulk_above}

    def save(partial: dict | None = None) -> None:
        """Write what is measured so far (``partial``: the row being measured, marked so)."""
        rows = results + ([{**partial, "partial": True}] if partial is not None else [])
        doc = _document(command, config, round(time.perf_counter() - t0, 1), rows)
        if before is not None:
            doc = _merged(before, doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")

    options = {"dim": args.dim, "clients": args.clients, "requests": requests, "publishes": publishes,
               "workers": args.workers, "refresh_counts": refresh_counts, "bulk_above": args.bulk_above,
               "keep_data": args.keep_data, "checkpoint": save}
    if args.reuse_data is not None:
        sizes, pg_sizes = [], []
        results.append(run("sqlite", None, 0, **options, reuse=args.reuse_data))
        save()
        print(_summary_line(results[-1]), flush=True)
    for n in sorted(set(sizes) | set(pg_sizes)):
        if n in sizes:
            results.append(run("sqlite", None, n, **options))
            save()
            print(_summary_line(results[-1]), flush=True)
        if n in pg_sizes:
            import pg

            reason = pg.unavailable_reason()
            if reason:
                results.append({"backend": "postgresql", "adapters": n, "skipped": reason})
                continue
            with pg.cluster() as cluster:
                results.append(run("postgresql", cluster.create_database("scale"), n, **options))
            save()
            print(_summary_line(results[-1]), flush=True)
    save()
    print(f"wrote {out}")
    return 0


def _document(command: str, config: dict, seconds: float, results: list[dict]) -> dict:
    """The results file: what was measured and how, the goals, and the rows."""
    return {
        "what": "The registry with N synthetic signed adapters: req/s, p50 and p99 of each read endpoint beside "
                "/healthz under the same load (clients threads, requests each, after a warm-up), publish latency "
                "of real signed uploads into the full library (one after another), and a node's TUF sync (a "
                "TufIndex over tuf.ngclient against the server: cold start, then a refresh after each count of "
                "new signed uploads; bytes counted at its fetcher by kind, wall time of refresh() alone). Same "
                "machine, one run: SQLite and PostgreSQL side by side at each size both are asked for. While the "
                "reads are measured the load generator's heap is frozen out of its garbage collector (gc.freeze), "
                "so its own ~100 ms collections do not count as slow answers.",
        "how_filled": "bulk: n_keys Ed25519 keys (one per 250 adapters, >= 4); one manifest template validated by "
                      "the Manifest schema and encoded canonically, then per adapter its name, publisher, domain "
                      "and unit centroid spliced into the template's canonical bytes (checked equal to "
                      "Manifest.to_canonical() every 10,000th adapter) and Ed25519-signed; manifest + signature "
                      "written as content-addressed blobs, weights/config one shared blob each; that work in "
                      "`workers` processes, 5,000 adapters a batch, while the main process inserts each batch "
                      "through the registry's ORM tables (one INSERT per table and batch); the library version "
                      "raised by one per key and adapter; then ANALYZE (planner statistics); then the TUF "
                      "repository built from the database as the server's first start builds it "
                      "(semla.server.tufsync.ensure_repository: the registry key, one root key, TufSync.rebuild "
                      "signing every bin and shard; fill.tuf_build_s). Not through POST /v1/adapters (1M "
                      "uploads one by one would take hours).",
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "server, load clients and database share the same cores"},
        "config": config,
        "goals": GOALS,
        "seconds": seconds,
        "results": results,
    }


if __name__ == "__main__":
    sys.exit(main())
