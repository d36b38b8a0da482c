"""The registry's retrieval table after a change: updated with the changed names, or read whole.

``POST /v1/retrieve`` keeps each base's centroid table in memory, labelled with the library
version. The first retrieval after a change brings the table up to date; this measures what that
costs, at library sizes where it matters.

For each size it bulk-fills a SQLite registry with N real signed adapters (``index_scale.py``'s
fill, TUF repository included) and opens the registry service in this process. Then:

* **read whole**: the first retrieval, which builds the table from every newest live row (what
  every change used to cost);
* **after each change**, in this order: 1, 100 and 1,000 new adapters (rows and a TUF sync, the
  rows stamped as a publish stamps them), one version revoked and one key revoked (each a signed
  request through the service, as the API runs them): the first retrieval after it (which
  updates the table), a second one (the steady state), and the table read whole at the same
  library version, checked equal to the updated one (names, versions, vectors, spreads and the
  answer to a query).

Above ``ann.ANN_THRESHOLD`` centroids (100,000) the table carries an IVF index: an update copies
it and moves its rows; reading whole trains a new one.

    python benchmarks/retrieval_table.py                  # 100k and 1M adapters
    python benchmarks/retrieval_table.py --sizes 10k      # one size
    python benchmarks/retrieval_table.py --quick          # 500 adapters, then 1 and 10 new (the test)

Results: benchmarks/results/retrieval_table.json (``--quick``: a temporary file unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent))

import index_scale  # noqa: E402  (puts tests/ on the path for bundle_factory)
import bundle_factory  # noqa: E402

from semla.registry import keys  # noqa: E402
from semla.registry import node as node_module  # noqa: E402
from semla.registry.tufindex import LibraryChange, TufIndex, bin_for, by_name_version  # noqa: E402
from semla.schemas import AdapterSummary, RetrieveRequest, revocation_payload  # noqa: E402
from semla.server import ServerSettings, create_app  # noqa: E402
from semla.server.db import Adapter, library_version  # noqa: E402
from semla.server.service import retrieval as retrieval_service  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: New adapters before each measured update (then a version and a key are revoked).
ADD_COUNTS = (1, 100, 1000)


def _retrieve_ms(service, query: list[float]) -> float:
    t0 = time.perf_counter()
    service.retrieve(RetrieveRequest(embedding=query, base_fingerprint=bundle_factory.FINGERPRINT, top_k=5))
    return (time.perf_counter() - t0) * 1000


def _read_whole(service, dim: int) -> tuple[retrieval_service.BaseTable, float]:
    t0 = time.perf_counter()
    with service._reads() as conn:
        rows = retrieval_service._newest_rows(conn, bundle_factory.FINGERPRINT)
        table = retrieval_service.BaseTable.of(library_version(conn), *retrieval_service._parse(rows, dim))
    return table, time.perf_counter() - t0


def _same(a: retrieval_service.BaseTable, b: retrieval_service.BaseTable) -> bool:
    """The same version, adapters (names, versions, publishers), vectors and spreads."""
    fields = ("names", "versions", "publishers")
    return (a.generation == b.generation
            and all(np.array_equal(getattr(a.adapters, f), getattr(b.adapters, f)) for f in fields)
            and np.array_equal(a.table.vectors, b.table.vectors) and np.array_equal(a.table.owner, b.table.owner)
            and np.array_equal(a.table.spread, b.table.spread, equal_nan=True))


def _recall(table: retrieval_service.BaseTable, queries: np.ndarray, k: int = 5) -> float | None:
    """Top-``k`` recall of the table's ANN index against brute force (None below the threshold)."""
    if table.index is None:
        return None
    got = table.index.search(queries, top_k=k)[0]
    want = retrieval_service.retrieve_numpy(queries, table.table, top_k=k)[0]
    return round(float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist())])), 3)


def run(n: int, *, dim: int, workers: int, keep_data: bool, add_counts: tuple[int, ...] = ADD_COUNTS) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix=f"semla-rtable-{n}-"))
    try:
        print(f"[{n}] filling ...", flush=True)
        lib, fill = index_scale.bulk_fill("sqlite", f"sqlite:///{data_dir / 'registry.db'}", data_dir, n, dim,
                                          workers=workers)
        # The changes below are written to the database directly, as another replica's would be:
        # with no recheck window the retrieval right after each one reads the library version.
        app = create_app(ServerSettings(data_dir=data_dir, admin_token=index_scale.TOKEN, metrics=False,
                                        retrieval_recheck_s=0))
        service = app.state.service
        rng = np.random.default_rng(5)
        query = index_scale._unit_rows(rng, 1, dim)[0]
        first_ms = _retrieve_ms(service, query)
        row: dict = {"adapters": n, "fill": fill, "first_retrieval_reads_whole_ms": round(first_ms, 1),
                     "ann_index": service._tables[bundle_factory.FINGERPRINT].index is not None, "changes": []}
        print(f"[{n}] first retrieval (read whole) {first_ms:.0f} ms", flush=True)
        # The ANN index's recall is checked on in-distribution queries: stored centroids, moved a little.
        stored = service._tables[bundle_factory.FINGERPRINT].table.vectors
        probes = stored[rng.choice(len(stored), 200, replace=False)] + 0.02 * rng.standard_normal((200, dim))

        def measure(what: str, change) -> None:
            info = change() or {}
            update_ms = _retrieve_ms(service, query)
            steady_ms = _retrieve_ms(service, query)
            updated = service._tables[bundle_factory.FINGERPRINT]
            whole, whole_s = _read_whole(service, dim)
            entry = {"change": what, **info, "first_retrieval_ms": round(update_ms, 1),
                     "next_retrieval_ms": round(steady_ms, 1), "read_whole_ms": round(whole_s * 1000, 1),
                     "equal_to_read_whole": _same(updated, whole),
                     "ann_recall_at_5": {"updated": _recall(updated, probes), "read_whole": _recall(whole, probes)}}
            row["changes"].append(entry)
            print(f"[{n}] {what}: first retrieval {update_ms:.1f} ms (read whole {whole_s * 1000:.0f} ms), "
                  f"equal {entry['equal_to_read_whole']}", flush=True)

        def revoke_version() -> dict:
            name = lib.names[len(lib.names) // 2]
            (version,) = service.adapter_versions(name).items
            signer = next(s for s in lib.signers if keys.key_id(s) == version.publisher)
            service.revoke_version(name, 1, keys.sign(signer, revocation_payload(name, 1)))
            return {"name": name}

        def revoke_key() -> dict:
            key_id = keys.key_id(lib.signers[1])
            service.revoke_key(key_id)
            with service._reads() as conn:
                names = conn.execute(select(func.count()).where(Adapter.publisher_key_id == key_id)).scalar_one()
            return {"names_of_the_key": names}

        for k in add_counts:
            measure(f"{k} new adapters", lambda k=k: {"added": index_scale.bulk_add(lib, k, workers=workers)})
        measure("one version revoked", revoke_version)
        measure("one key revoked", revoke_key)
        return row
    finally:
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


NODE_WHAT = ("A node's own work after a TUF refresh that brought one new adapter and took one away, two of "
             "8,192 bins changed (synthetic summaries, no registry): checking every listed adapter and building "
             "the table whole (what each pull once did), against the held summaries known by identity, the new ones "
             "checked and the table spliced (a pass over the list), against following the index's change "
             "(bisection, the new ones checked, one splice); and the index's sorted library list, sorted anew "
             "against merged. Each checked to give the same library and table.")


def node_table(n: int, dim: int) -> dict:
    """A node's own work after a TUF refresh that brought one new adapter and took one away.

    ``n`` synthetic summaries in 8,192 hashed bins stand in for what a node's TUF index lists (no
    registry: this is the node's work after the download). The refresh changes two bins, and
    each changed bin's adapters come back as new objects (the index parses a changed bin whole).
    Timed, each checked to give the same library and table:

    * the index's sorted list: sorted anew, against the held list merged with the change
      (``TufIndex._merged``);
    * the node's library and centroid table: every listed adapter checked and the table built
      whole (what each pull once did); the held summaries known by identity, the new ones
      checked, the table spliced (``Node._listed``, a pass over the list); the index's change
      followed (``Node._applied``: bisection, the new ones checked, one splice).
    """
    rng = np.random.default_rng(9)
    vectors = np.asarray(index_scale._unit_rows(rng, n + 1, dim))

    def summary(i: int) -> AdapterSummary:
        return AdapterSummary(name=f"adapter-{i:07d}", version=1, publisher="0" * 16, base_fingerprint="f" * 64,
                              domain="bench", sample_count=64, manifest_sha256="0" * 64,
                              centroids=[vectors[i].tolist()], created_at="2026-01-01T00:00:00Z")

    def bin_of(a: AdapterSummary) -> str:
        return bin_for(a.name, 13)

    t0 = time.perf_counter()
    library = [summary(i) for i in range(n)]
    made_s = time.perf_counter() - t0
    index = TufIndex(None, "http://127.0.0.1", Path(tempfile.gettempdir()))
    bins: dict[str, tuple[int, list]] = {}
    for a in library:
        bins.setdefault(bin_of(a), (1, []))[1].append(a)
    index.bins = bins
    listed = index.library()
    gone_one = library[n // 3]
    new = summary(n).model_copy(update={"name": f"adapter-{2 * n // 3:07d}a"})
    after = {}  # the two changed bins, parsed anew: new objects
    for name in {bin_of(gone_one), bin_of(new)}:
        version, adapters = bins.get(name, (0, []))
        after[name] = (version + 1, [a.model_copy() for a in adapters if a is not gone_one]
                       + ([new] if name == bin_of(new) else []))
    gone = [a for name in after for a in bins.get(name, (0, []))[1]]
    came = sorted((a for name in after for a in after[name][1]), key=by_name_version)
    t0 = time.perf_counter()
    resorted = sorted((a for _, adapters in {**bins, **after}.values() for a in adapters), key=by_name_version)
    sort_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = index._merged(gone, came)
    merge_s = time.perf_counter() - t0
    assert merged == resorted and len(merged) == n
    print(f"[node {n}] sorted library after one change: {sort_s:.2f} s sorted, {merge_s * 1000:.0f} ms merged", flush=True)

    def node() -> SimpleNamespace:  # a node holding ``listed``, as after its last pull
        held = SimpleNamespace(library=listed, _table=node_module._table(listed), excluded={},
                               card=SimpleNamespace(embedding=SimpleNamespace(dim=dim)),
                               base=SimpleNamespace(ref=SimpleNamespace(fingerprint="f" * 64)))
        for method in ("_unusable_listing", "_table_of", "_listed", "_applied"):
            setattr(held, method, getattr(node_module.Node, method).__get__(held))
        return held

    checking = node()
    t0 = time.perf_counter()  # what a pull once did: check every listed adapter, build the table whole
    unusable = [checking._unusable_listing(a) for a in merged]
    rebuilt = node_module._table(merged)
    before_s = time.perf_counter() - t0
    by_pass = node()
    t0 = time.perf_counter()
    pass_library, pass_table, _, changed = by_pass._listed(merged)
    pass_s = time.perf_counter() - t0
    following = node()
    t0 = time.perf_counter()
    applied = following._applied(LibraryChange(listed, gone, came))
    follow_s = time.perf_counter() - t0
    assert changed and not any(unusable) and applied is not None
    equal = all(np.array_equal(t.vectors, rebuilt.vectors) and np.array_equal(t.owner, rebuilt.owner)
                for t in (pass_table, applied[1])) and pass_library == applied[0] == merged
    print(f"[node {n}] table after one change: {before_s:.2f} s rebuilt, {pass_s * 1000:.0f} ms by a pass over "
          f"the list, {follow_s * 1000:.0f} ms following the change", flush=True)
    return {"adapters": n, "summaries_made_s": round(made_s, 1), "changed_bins": len(after),
            "gone": len(gone), "came": len(came), "check_all_and_rebuild_s": round(before_s, 3),
            "check_new_and_splice_s": round(pass_s, 3), "follow_change_s": round(follow_s, 3), "equal": equal,
            "library_sorted_anew_s": round(sort_s, 3), "library_merged_s": round(merge_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=index_scale._sizes, default=None, help="library sizes (default 100k,1M)")
    parser.add_argument("--quick", action="store_true", help="500 adapters, then 1 and 10 new ones (the test)")
    parser.add_argument("--dim", type=int, default=64, help="centroid dimension (default 64)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that sign and write blobs during the fill (default: cores, at most 8)")
    parser.add_argument("--keep-data", action="store_true", help="keep each filled data dir (deleted by default)")
    parser.add_argument("--node-only", action="store_true",
                        help="measure only the node's part and replace it in --out (the results file by default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([500] if args.quick else [100_000, 1_000_000])
    out = args.out or (Path(tempfile.mkdtemp(prefix="semla-rtable-")) / "retrieval_table.json" if args.quick
                       else ROOT / "benchmarks" / "results" / "retrieval_table.json")
    t0 = time.perf_counter()
    command = ("python benchmarks/retrieval_table.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.node_only:
        doc = json.loads(out.read_text())
        doc["node"] = [node_table(n, args.dim) for n in sizes]
        doc["node_command"], doc["node_what"] = command, NODE_WHAT
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    results = [run(n, dim=args.dim, workers=args.workers, keep_data=args.keep_data,
                   add_counts=(1, 10) if args.quick else ADD_COUNTS) for n in sizes]
    node = [node_table(n, args.dim) for n in sizes]
    doc = {
        "what": "POST /v1/retrieve's centroid table after a change to the library: the first retrieval after it "
                "(which updates the table with the names changed since its version), the next one, and the table "
                "read whole at the same version (what every change cost before), checked equal. In-process "
                "(the registry service, no HTTP), SQLite, real signed adapters.",
        "command": command,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "dim": args.dim, "seconds": round(time.perf_counter() - t0, 1), "results": results,
        "node_what": NODE_WHAT,
        "node": node,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
