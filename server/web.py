"""A small server-rendered web page for people: the adapter library and one page per adapter.

``add_web_routes(app)`` adds three things to a registry app built by
:func:`semla.server.create_app` (it reads ``app.state.service`` at request time):

* ``GET /`` - the library, one page at a time (``?after=`` is the next page's cursor): the newest
  version of each adapter in a table, a search box (``?q=``, searched in the database so it works
  without JavaScript and over the whole library, and narrowed live in the browser with a few lines
  of inline JS), and a 2-D PCA map of the page's adapters' first centroids, drawn as inline SVG.
* ``GET /adapters/{name}`` - one adapter's provenance from its newest signed manifest, the
  signature status (the stored bundle is verified again on every view), files and versions.
* ``GET /keys`` - the publisher keys with the DP ε each publisher has spent on centroids and
  what its budget leaves, one page at a time like the library.
* an HTML 404 page for unknown or invalid names.

Everything is inline (CSS, SVG, JS): the page loads no external URL. Every string that comes
from a publisher (names, domains, labels, vocabulary, ...) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from semla.registry.bundle import check_bundle, sha256_bytes
from semla.schemas import (
    BUNDLE_FILES,
    MANIFEST_FILE,
    NAME_PATTERN,
    AdapterSummary,
    KeyPublic,
    Manifest,
)
from semla.schemas.errors import InvalidInputError, NotFoundError, SemlaError

__all__ = ["add_web_routes", "matches_query", "pca_map"]

_NAME_RE = re.compile(NAME_PATTERN)
#: Longest search string honoured (longer input is cut, never refused).
MAX_QUERY = 256
#: Rows on one page of the library, of the keys and of an adapter's versions (``?after=`` pages on).
PAGE_SIZE = 100
#: Parsed manifests kept per app, keyed by the manifest's sha256 (content-addressed, so never stale).
_CACHE_LIMIT = 4096


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


# -- data helpers ---------------------------------------------------------------------------------
def matches_query(query: str, *fields: str) -> bool:
    """True when every whitespace-separated word of ``query`` occurs (any case) in the fields."""
    haystack = " ".join(fields).lower()
    return all(word in haystack for word in query.lower().split())


def pca_map(summaries: list[AdapterSummary]) -> dict[str, Any] | None:
    """2-D PCA of the first centroid of each adapter of the most common base model.

    Centroids of different base models live in different embedding spaces, so only the base
    (fingerprint) shared by the most adapters is mapped. Returns ``None`` when there is nothing
    to draw, else ``{"fingerprint", "points": [(summary, x, y)], "explained": (r1, r2),
    "others": n_not_shown}`` with x, y in [-1, 1].
    """
    if not summaries:
        return None
    counts = Counter(s.base_fingerprint for s in summaries)
    fingerprint = min(counts, key=lambda fp: (-counts[fp], fp))
    group = [s for s in summaries if s.base_fingerprint == fingerprint and s.centroids]
    if not group:
        return None
    dims = Counter(len(s.centroids[0]) for s in group)
    dim = min(dims, key=lambda d: (-dims[d], d))
    group = [s for s in group if len(s.centroids[0]) == dim]
    x = np.asarray([s.centroids[0] for s in group], dtype=np.float64)
    centred = x - x.mean(axis=0, keepdims=True)
    coords = np.zeros((len(group), 2))
    explained = (0.0, 0.0)
    if len(group) > 1:
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        n_comp = min(2, vt.shape[0])
        coords[:, :n_comp] = centred @ vt[:n_comp].T
        var = sing**2
        total = float(var.sum())
        if total > 0:
            ratios = [float(v / total) for v in var[:2]] + [0.0, 0.0]
            explained = (ratios[0], ratios[1])
    scale = float(np.abs(coords).max())
    if scale > 0:
        coords /= scale
    return {
        "fingerprint": fingerprint,
        "points": [(s, float(cx), float(cy)) for s, (cx, cy) in zip(group, coords)],
        "explained": explained,
        "others": len(summaries) - len(group),
    }


class _Manifests:
    """Parsed newest manifests, cached by manifest sha256 (thread-safe, bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, Manifest] = {}

    def get(self, service: Any, summary: AdapterSummary) -> Manifest | None:
        with self._lock:
            hit = self._cache.get(summary.manifest_sha256)
        if hit is not None:
            return hit
        try:
            manifest = Manifest.parse(service.file_bytes(summary.name, summary.version, MANIFEST_FILE,
                                                         include_revoked=True))
        except (SemlaError, RuntimeError, OSError):
            return None
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[summary.manifest_sha256] = manifest
        return manifest


def _manifests(app: FastAPI) -> _Manifests:
    cache = getattr(app.state, "web_manifests", None)
    if cache is None:
        cache = app.state.web_manifests = _Manifests()
    return cache


def _short(fingerprint: str, n: int = 12) -> str:
    return fingerprint[:n]


def _fmt_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


# -- layout ---------------------------------------------------------------------------------------
_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1d2330;background:#f4f6f9}
header{background:#1f3a5f;color:#fff;padding:12px 28px;display:flex;align-items:baseline;gap:18px}
header a{color:#fff;text-decoration:none}
header .brand{font-size:20px;font-weight:600}
header nav{margin-left:auto;font-size:14px}
header nav a{margin-left:16px;opacity:.85}
main{max-width:1220px;margin:0 auto;padding:18px 28px 40px}
h1{font-size:22px;margin:6px 0 12px}
h2{font-size:17px;margin:0 0 10px}
a{color:#1f5fae}
.card{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:14px 18px;margin-bottom:16px}
.mapbox{display:grid;grid-template-columns:minmax(0,660px) minmax(0,1fr);gap:20px;align-items:start}
td.nowrap,th{white-space:nowrap}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start;margin-bottom:16px}
.grid2 .card{margin-bottom:0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e7ebf0;vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5a6474;font-weight:600}
tbody tr:hover{background:#f3f7fc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:13px}
.muted{color:#69727f}
.small{font-size:13px}
form.search{display:flex;gap:8px;margin-bottom:12px}
form.search input{flex:1;padding:7px 10px;font-size:15px;border:1px solid #b9c3cf;border-radius:6px}
form.search button{padding:7px 14px;font-size:15px;border:1px solid #1f3a5f;background:#1f3a5f;color:#fff;
 border-radius:6px;cursor:pointer}
.hidden{display:none}
.tag{display:inline-block;background:#eef2f7;border:1px solid #d8e0ea;border-radius:10px;padding:0 8px;
 margin:0 4px 4px 0;font-size:13px}
.ok{color:#17803d;font-weight:600}
.bad{color:#c0262d;font-weight:600}
.status{padding:10px 14px;border-radius:6px;margin-bottom:16px;font-size:16px}
.status.ok{background:#e7f6ec;border:1px solid #a9dcb9}
.status.bad{background:#fdecec;border:1px solid #f0b3b5}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dl.kv dt{color:#5a6474}
dl.kv dd{margin:0;overflow-wrap:anywhere}
svg.map{width:100%;height:auto;background:#fbfcfe;border:1px solid #e3e8ef;border-radius:6px}
svg.map circle{stroke:#fff;stroke-width:1.5}
svg.map text{font:13px system-ui,"DejaVu Sans",sans-serif;fill:#1d2330}
svg.map .axis{stroke:#cfd7e2;stroke-dasharray:4 4}
svg.map .dim{opacity:.18}
"""

_JS = """
(function(){
  var box=document.getElementById('q'); if(!box) return;
  var count=document.getElementById('count');
  function apply(){
    var words=box.value.toLowerCase().split(/\\s+/).filter(Boolean), shown=0;
    document.querySelectorAll('tr[data-search]').forEach(function(el){
      var hit=words.every(function(w){return el.getAttribute('data-search').indexOf(w)>=0;});
      el.classList.toggle('hidden',!hit); if(hit) shown++;
    });
    document.querySelectorAll('g[data-search]').forEach(function(el){
      var hit=words.every(function(w){return el.getAttribute('data-search').indexOf(w)>=0;});
      el.classList.toggle('dim',!hit);
    });
    if(count) count.textContent=shown;
  }
  box.addEventListener('input',apply);
})();
"""


def _page(title: str, body: str, *, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        "<header><a class=\"brand\" href=\"/\">SemLA registry</a>"
        "<span class=\"small\">signed LoRA adapters</span>"
        "<nav><a href=\"/\">Library</a><a href=\"/v1/adapters\">JSON index</a>"
        "<a href=\"/keys\">Keys</a><a href=\"/docs\">API docs</a></nav></header>"
        f"<main>{body}</main>{js}</body></html>"
    )


def _not_found(message: str) -> HTMLResponse:
    body = (
        "<h1>Not found</h1><div class=\"card\">"
        f"<p>{esc(message)}</p><p><a href=\"/\">Back to the library</a></p></div>"
    )
    return HTMLResponse(_page("Not found - SemLA registry", body), status_code=404)


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are already-escaped HTML."""
    return "<dl class=\"kv\">" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


# -- the library ----------------------------------------------------------------------------------
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22")


def _search_key(summary: AdapterSummary) -> str:
    return f"{summary.name} {summary.domain}".lower()


def _map_svg(data: dict[str, Any], query: str, arch: str | None) -> str:
    width, height, pad = 660, 340, 40
    r1, r2 = data["explained"]
    parts = [
        (f"<svg class=\"map\" viewBox=\"0 0 {width} {height}\" role=\"img\" "
         "aria-label=\"PCA map of adapter centroids\" xmlns=\"http://www.w3.org/2000/svg\">"),
        f"<line class=\"axis\" x1=\"{pad}\" y1=\"{height / 2}\" x2=\"{width - pad}\" y2=\"{height / 2}\"/>",
        f"<line class=\"axis\" x1=\"{width / 2}\" y1=\"{pad / 2}\" x2=\"{width / 2}\" y2=\"{height - pad / 2}\"/>",
        f"<text x=\"{width - pad}\" y=\"{height / 2 - 6}\" text-anchor=\"end\">PC1 ({r1:.0%})</text>",
        f"<text x=\"{width / 2 + 6}\" y=\"{pad / 2 + 10}\">PC2 ({r2:.0%})</text>",
    ]
    half_w, half_h = (width - 2 * pad) / 2, (height - 2 * pad) / 2
    for i, (summary, x, y) in enumerate(data["points"]):
        px, py = width / 2 + x * half_w, height / 2 - y * half_h
        colour = _PALETTE[i % len(_PALETTE)]
        anchor = "end" if x > 0.05 else "start"
        dx = -9 if anchor == "end" else 9
        if not matches_query(query, summary.name, summary.domain):
            continue  # filtered on the server: positions stay those of the full map
        parts.append(
            f"<g data-search=\"{esc(_search_key(summary))}\">"
            f"<title>{esc(summary.name)} v{summary.version}: {esc(summary.domain)}</title>"
            f"<a href=\"/adapters/{esc(summary.name)}\">"
            f"<circle cx=\"{px:.1f}\" cy=\"{py:.1f}\" r=\"7\" fill=\"{colour}\"/>"
            f"<text x=\"{px + dx:.1f}\" y=\"{py - 4:.1f}\" text-anchor=\"{anchor}\" font-weight=\"600\">"
            f"{esc(summary.name)}</text>"
            f"<text x=\"{px + dx:.1f}\" y=\"{py + 11:.1f}\" text-anchor=\"{anchor}\" fill=\"#5a6474\">"
            f"{esc(_clip(summary.domain, 40))}</text></a></g>"
        )
    base = f"{esc(arch)} " if arch else ""
    others = data["others"]
    drawn = sum(matches_query(query, s.name, s.domain) for s, _, _ in data["points"])
    if drawn < len(data["points"]):
        parts.append(f"<text x=\"{pad}\" y=\"{height - 10}\">{drawn} of {len(data['points'])} adapters match "
                     "the search</text>")
    note = (
        f"First centroid of each adapter on base {base}<code>{esc(_short(data['fingerprint']))}</code>, "
        "projected on its two principal components (numpy PCA). Near points = adapters trained on "
        "similar-looking images. Centroids of different base models live in different embedding spaces, "
        "so only the most common base is mapped"
        + (f"; {others} adapter{'s' if others != 1 else ''} on other bases not shown." if others else ".")
    )
    parts.append("</svg>")
    return f"<div class=\"mapbox\">{''.join(parts)}<p class=\"muted small\">{note}</p></div>"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _bad_page(message: str) -> HTMLResponse:
    body = (f"<h1>Bad request</h1><div class=\"card\"><p>{esc(message)}</p>"
            "<p><a href=\"/\">Back to the first page of the library</a></p></div>")
    return HTMLResponse(_page("Bad request - SemLA registry", body), status_code=400)


def _next_link(path: str, cursor: str | None, text: str, **params: str) -> str:
    """A "next page" link (HTML) carrying ``cursor`` and the page's other parameters, or ''."""
    if cursor is None:
        return ""
    query = urlencode({**{k: v for k, v in params.items() if v}, "after": cursor})
    return f"<p class=\"pager\"><a rel=\"next\" href=\"{esc(path)}?{esc(query)}\">{esc(text)} &rarr;</a></p>"


def _library(request: Request, q: str | None, after: str | None) -> HTMLResponse:
    service = request.app.state.service
    query = (q or "")[:MAX_QUERY].strip()
    try:  # the search runs in the database, one page at a time
        page = service.list_adapters(search=query or None, cursor=after, limit=PAGE_SIZE)
    except InvalidInputError as exc:
        return _bad_page(exc.message)
    manifests = _manifests(request.app)
    shown = page.items
    rows = []
    for s in shown:
        manifest = manifests.get(service, s)
        arch = esc(manifest.base_model.arch) if manifest else "<span class=\"muted\">?</span>"
        created = manifest.created_at if manifest else s.created_at
        rows.append(
            f"<tr data-search=\"{esc(_search_key(s))}\">"
            f"<td class=\"nowrap\"><a href=\"/adapters/{esc(s.name)}\"><strong>{esc(s.name)}</strong></a></td>"
            f"<td>{esc(s.domain)}</td><td class=\"num\">v{s.version}</td>"
            f"<td><code>{esc(s.publisher)}</code></td><td class=\"num\">{s.sample_count}</td>"
            f"<td class=\"nowrap\">{arch} <code class=\"muted\">{esc(_short(s.base_fingerprint))}</code></td>"
            f"<td class=\"small nowrap\">{esc(created)}</td></tr>"
        )
    if not shown and not query and after is None:
        table = "<p class=\"muted\">No adapters have been published yet.</p>"
    else:
        empty = "" if shown else "<p class=\"muted\">No adapter matches this search.</p>"
        table = (
            "<table><thead><tr><th>Name</th><th>Domain</th><th>Version</th><th>Publisher key</th>"
            "<th>Samples</th><th>Base model</th><th>Created</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>" + empty
        )
    data = pca_map(shown)
    if data is None:
        map_html = "<p class=\"muted\">The map appears once adapters are published.</p>"
    else:
        first = next((s for s, _, _ in data["points"]), None)
        man = manifests.get(service, first) if first is not None else None
        map_html = _map_svg(data, query, man.base_model.arch if man else None)
    clear = " <a href=\"/\">clear</a>" if query else ""
    body = (
        "<h1>Adapter library</h1>"
        "<section class=\"card\">"
        "<form class=\"search\" method=\"get\" action=\"/\" role=\"search\">"
        f"<input id=\"q\" name=\"q\" type=\"search\" value=\"{esc(query)}\" autocomplete=\"off\" "
        "placeholder=\"Search name or domain, e.g. fog\" aria-label=\"search adapters\">"
        "<button type=\"submit\">Search</button></form>"
        f"<p class=\"muted small\">Showing <span id=\"count\">{len(shown)}</span> adapters "
        f"{'from' if after else 'on'} {'a later' if after else 'the first'} page (newest version of each name, "
        f"by name, {PAGE_SIZE} a page).{clear}</p>{table}"
        + _next_link("/", page.next_cursor, "Next page", q=query) + "</section>"
        f"<section class=\"card\"><h2>Map of centroids</h2>{map_html}</section>"
    )
    return HTMLResponse(_page("SemLA registry - adapters", body, script=_JS))


# -- one adapter ----------------------------------------------------------------------------------
def _signature_status(service: Any, summary: AdapterSummary, keys: list[KeyPublic]) -> tuple[bool, str]:
    """Re-verify the stored bundle against the active publisher keys: (ok, escaped HTML)."""
    try:
        files = {f: service.file_bytes(summary.name, summary.version, f, include_revoked=True) for f in BUNDLE_FILES}
    except (SemlaError, RuntimeError, OSError) as exc:
        return False, f"<span class=\"bad\">storage_error</span>: {esc(exc)}"
    trusted = {k.key_id: bytes.fromhex(k.public_key) for k in keys if k.active}
    report = check_bundle(files, trusted)
    if report.error is None:
        return True, "<span class=\"ok\">verified</span>"
    return False, f"<span class=\"bad\">{esc(report.error.code)}</span>: {esc(report.error.message)}"


def _adapter(request: Request, name: str) -> HTMLResponse:
    if not _NAME_RE.fullmatch(name):
        return _not_found("That is not a valid adapter name (lower-case letters, digits, '.', '_', '-').")
    service = request.app.state.service
    try:
        versions_page = service.adapter_versions(name, limit=PAGE_SIZE)
    except NotFoundError:
        return _not_found(f"No adapter named {name!r} is published in this registry.")
    versions = versions_page.items
    newest = versions[0]
    try:
        key = service.get_key(newest.publisher)
    except NotFoundError:
        key = None
    ok, status_html = _signature_status(service, newest, [key] if key is not None else [])
    manifest = _manifests(request.app).get(service, newest)

    if key is None:
        key_html = f"<code>{esc(newest.publisher)}</code> <span class=\"bad\">not registered</span>"
    else:
        state = "<span class=\"ok\">active</span>" if key.active else "<span class=\"bad\">inactive</span>"
        key_html = f"<code>{esc(key.key_id)}</code> &middot; {esc(key.label) or '<i>no label</i>'} &middot; {state}"

    sections = [
        f"<h1>{esc(name)} <span class=\"muted\">v{newest.version}</span></h1>",
        (f"<div class=\"status {'ok' if ok else 'bad'}\">Signature: {status_html}"
         " <span class=\"muted small\">(stored bundle re-verified now against the registry's active "
         "publisher keys)</span></div>"),
    ]
    if manifest is None:
        sections.append("<div class=\"card bad\">The stored manifest could not be read.</div>")
    else:
        m = manifest
        base = m.base_model
        training = [
            ("steps", esc(m.training.steps)), ("learning rate", esc(f"{m.training.lr:g}")),
            ("batch size", esc(m.training.batch_size)), ("seed", esc(m.training.seed)),
        ]
        fed = m.training.federated
        if fed is not None:
            training.append(("federated", esc(
                f"{fed.rounds} rounds, {fed.participants} participants, secure aggregation "
                f"{'on' if fed.secure_aggregation else 'off'}")))
        else:
            training.append(("federated", "<span class=\"muted\">no (trained by one data owner)</span>"))
        p = m.privacy
        privacy = [("mechanism", esc(p.mechanism)), ("min samples", esc(p.min_samples))]
        if p.mechanism != "none":
            privacy += [("epsilon", esc(p.epsilon)), ("delta", esc(p.delta)),
                        ("clip norm", esc(p.clip_norm) if p.clip_norm is not None else "&ndash;")]
        if key is not None:
            privacy.append(("publisher's spend", f"<a href=\"/keys#{esc(key.key_id)}\">"
                            f"{esc(_spend(key.epsilon_spent, service.epsilon_budget))}</a>"))
        provenance = [
            ("domain", esc(m.domain)),
            ("publisher key", key_html),
            ("sample count", esc(m.sample_count)),
            ("created (signed)", esc(m.created_at)),
            ("published (registry)", esc(newest.created_at)),
            ("revocations", "<span id=\"revocations\">"
             + (esc(", ".join(f"v{v.version} revoked by its publisher" for v in versions if v.revoked)) or "none")
             + "</span>"),
        ]
        model = [
            ("base arch", esc(base.arch)), ("base tag", esc(base.tag) or "<span class=\"muted\">&ndash;</span>"),
            ("open_clip", esc(base.open_clip_version)),
            ("fingerprint", f"<code>{esc(base.fingerprint)}</code>"),
            ("target modules", esc(len(m.target_modules))),
            ("rank / alpha", esc(f"{m.rank} / {m.alpha:g}")),
            ("centroids", esc(f"{len(m.centroids.vectors)} x {m.centroids.dim}-d")),
            ("embedding model", esc(m.centroids.embedding_model)),
        ]
        vocab = "".join(f"<span class=\"tag\">{esc(word)}</span>" for word in m.vocabulary)
        sections.append(
            "<div class=\"grid2\">"
            f"<section class=\"card\"><h2>Provenance</h2>{_kv(provenance)}</section>"
            f"<section class=\"card\"><h2>Model</h2>{_kv(model)}</section>"
            f"<section class=\"card\"><h2>Training</h2>{_kv(training)}</section>"
            f"<section class=\"card\"><h2>Privacy</h2>{_kv(privacy)}</section></div>"
            f"<section class=\"card\"><h2>Vocabulary ({len(m.vocabulary)})</h2>{vocab}</section>"
        )
        file_rows = []
        for fname in BUNDLE_FILES:
            entry = m.files.get(fname)
            if entry is not None:
                size, digest, where = entry.size, entry.sha256, "listed in manifest"
            else:
                try:
                    data = service.file_bytes(newest.name, newest.version, fname, include_revoked=True)
                except (SemlaError, RuntimeError, OSError):
                    file_rows.append(f"<tr><td>{esc(fname)}</td><td colspan=\"3\" class=\"bad\">missing</td></tr>")
                    continue
                size, digest, where = len(data), sha256_bytes(data), "stored"
            href = f"/v1/adapters/{esc(newest.name)}/{newest.version}/files/{esc(fname)}"
            file_rows.append(
                f"<tr><td><a href=\"{href}\">{esc(fname)}</a></td><td class=\"num\">{esc(_fmt_bytes(size))}</td>"
                f"<td><code>{esc(digest)}</code></td><td class=\"muted small\">{where}</td></tr>"
            )
        sections.append(
            "<section class=\"card\"><h2>Files</h2><table><thead><tr><th>File</th><th>Size</th><th>sha256</th>"
            "<th>Source</th></tr></thead><tbody>" + "".join(file_rows) + "</tbody></table></section>"
        )
    version_rows = "".join(
        f"<tr><td class=\"num\">v{v.version}</td><td>{esc(v.domain)}</td><td class=\"num\">{v.sample_count}</td>"
        f"<td><code>{esc(v.publisher)}</code></td><td><code>{esc(_short(v.manifest_sha256, 16))}</code></td>"
        f"<td class=\"small\">{esc(v.created_at)}</td>"
        f"<td><a href=\"/v1/adapters/{esc(v.name)}/{v.version}/manifest\">manifest.json</a></td></tr>"
        for v in versions
    )
    more = ""
    if versions_page.next_cursor is not None:
        older = f"/v1/adapters/{esc(name)}?{esc(urlencode({'cursor': versions_page.next_cursor}))}"
        more = f"<p class=\"pager\">Older versions: <a rel=\"next\" href=\"{older}\">JSON, next page</a></p>"
    count = f"the newest {len(versions)}" if more else str(len(versions))
    sections.append(
        f"<section class=\"card\"><h2>Versions ({count}, newest first)</h2><table><thead><tr>"
        "<th>Version</th><th>Domain</th><th>Samples</th><th>Publisher</th><th>Manifest sha256</th>"
        "<th>Published</th><th></th></tr></thead><tbody>" + version_rows + "</tbody></table>" + more + "</section>"
    )
    return HTMLResponse(_page(f"{name} - SemLA registry", "".join(sections)))


# -- keys and their privacy ledgers ---------------------------------------------------------------
def _spend(spent: float, budget: float | None) -> str:
    """``"ε 4 of 10 spent (6 left)"``, or ``"ε 4 spent (no limit)"``."""
    if budget is None:
        return f"\u03b5 {spent:g} spent (no limit)"
    return f"\u03b5 {spent:g} of {budget:g} spent ({max(0.0, budget - spent):g} left)"


def _keys(request: Request, after: str | None = None) -> HTMLResponse:
    service = request.app.state.service
    try:
        page = service.list_keys(cursor=after, limit=PAGE_SIZE)
    except InvalidInputError as exc:
        return _bad_page(exc.message)
    rows = []
    for k in page.items:
        if not k.active:
            state = "<span class=\"bad\">revoked</span>"
        elif k.rotated_to:
            state = f"rotated to <a href=\"#{esc(k.rotated_to)}\"><code>{esc(k.rotated_to)}</code></a>"
        else:
            state = "<span class=\"ok\">active</span>"
        rows.append(
            f"<tr id=\"{esc(k.key_id)}\"><td><code>{esc(k.key_id)}</code></td><td>{esc(k.label)}</td>"
            f"<td>{state}</td><td class=\"small nowrap\">{esc(k.created_at)}</td>"
            f"<td class=\"nowrap\"><a href=\"/v1/keys/{esc(k.key_id)}/privacy\">"
            f"{esc(_spend(k.epsilon_spent, service.epsilon_budget))}</a></td></tr>"
        )
    table = (
        "<table><thead><tr><th>Key id</th><th>Label</th><th>State</th><th>Registered</th><th>DP spend</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table>"
        if rows else "<p class=\"muted\">No publisher keys are registered yet.</p>"
    )
    body = (
        "<h1>Publisher keys</h1><section class=\"card\">"
        "<p class=\"muted small\">DP spend: the epsilon of every centroid a publisher released with differential "
        "privacy, summed over its keys (a rotated key's spend carries to its successor), against this "
        "registry's budget. Revoking a version refunds nothing. "
        "<a href=\"/v1/keys\">JSON</a></p>" + table + _next_link("/keys", page.next_cursor, "More keys")
        + "</section>"
    )
    return HTMLResponse(_page("Keys - SemLA registry", body))


# -- wiring ---------------------------------------------------------------------------------------
def add_web_routes(app: FastAPI) -> None:
    """Add ``GET /``, ``GET /adapters/{name}`` and ``GET /keys`` (HTML) to a registry app; safe to call twice."""
    if getattr(app.state, "web_routes", False):
        return
    app.state.web_routes = True

    def library(request: Request, q: str | None = None, after: str | None = None) -> HTMLResponse:
        return _library(request, q, after)

    def adapter(request: Request, name: str) -> HTMLResponse:
        return _adapter(request, name)

    app.add_api_route("/", library, methods=["GET"], response_class=HTMLResponse, include_in_schema=False,
                      name="web_library")
    app.add_api_route("/adapters/{name}", adapter, methods=["GET"], response_class=HTMLResponse,
                      include_in_schema=False, name="web_adapter")
    app.add_api_route("/keys", _keys, methods=["GET"], response_class=HTMLResponse, include_in_schema=False,
                      name="web_keys")
