"""The registry's web page for people: library, search, centroid map, adapter provenance, 404,
escaping of publisher strings; and the same pages rendered by a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import bundle_factory
import httpx
import pytest
from fastapi.testclient import TestClient
from semla.registry import keys
from semla.schemas import ADAPTER_WEIGHTS_FILE, AdapterSummary
from semla.server import ServerSettings, create_app
from semla.server.db import Publisher
from semla.server.local import serve_in_thread
from semla.server.web import add_web_routes, matches_query, pca_map

ADMIN = "web-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
INJECTION = "<script>alert(1)</script>"
LABEL = "Harbour lab <b>&</b>"
#: name -> domain of the three published adapters
ADAPTERS = {
    "fog-roads": "foggy highway driving",
    "night-city": "night-time city streets",
    "harbour-docks": f"harbour docks {INJECTION}",
}
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "registry_page.png"


# -- helpers --------------------------------------------------------------------------------------
def upload(client: TestClient, files: dict[str, bytes]) -> httpx.Response:
    parts = {name: (name, data, "application/octet-stream") for name, data in files.items()}
    return client.post("/v1/adapters", files=parts)


def build_registry(data_dir: Path, bundles_dir: Path, adapters: dict[str, str]):
    """A registry app with the web routes and ``adapters`` published by one key; returns (app, key id)."""
    bundle_factory.install_base_card(data_dir)
    app = create_app(ServerSettings(data_dir=data_dir, admin_token=ADMIN))
    add_web_routes(app)
    client = TestClient(app)
    key = keys.generate_key()
    resp = client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex(), "label": LABEL}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    for seed, (name, domain) in enumerate(adapters.items()):
        files = bundle_factory.make_bundle_files(bundles_dir, key, name=name, domain=domain, seed=seed)
        assert upload(client, files).status_code == 201
    # a second version of fog-roads, so the version list has two rows
    files = bundle_factory.make_bundle_files(bundles_dir, key, name="fog-roads", version=2,
                                             domain=ADAPTERS["fog-roads"], seed=7)
    assert upload(client, files).status_code == 201
    return app, resp.json()["key_id"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    return build_registry(tmp / "data", tmp, ADAPTERS)


@pytest.fixture(scope="module")
def client(registry):
    return TestClient(registry[0])


# -- server-rendered pages ------------------------------------------------------------------------
def test_library_lists_every_adapter_with_its_details(client, registry):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    for name in ADAPTERS:
        assert f'href="/adapters/{name}"' in page
    assert "foggy highway driving" in page and "night-time city streets" in page
    assert registry[1] in page  # publisher key id
    assert "semla-tiny" in page and bundle_factory.FINGERPRINT[:12] in page  # base arch + short fingerprint
    assert "v2" in page  # newest version of fog-roads
    assert "<svg" in page and "PC1" in page  # the centroid map
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing external
    assert "https://" not in page


def test_search_filters_on_the_server(client):
    page = client.get("/", params={"q": "FOG"}).text
    assert 'href="/adapters/fog-roads"' in page
    assert "night-city" not in page and "harbour-docks" not in page
    page = client.get("/", params={"q": "city streets"}).text  # every word must match
    assert "night-city" in page and "fog-roads" not in page
    page = client.get("/", params={"q": "docks"}).text  # by domain only
    assert "harbour-docks" in page and "fog-roads" not in page
    page = client.get("/", params={"q": "no-such-thing"}).text
    assert "No adapter matches" in page
    assert client.get("/", params={"q": "x" * 5000}).status_code == 200  # long input cut, not refused


def test_adapter_page_shows_provenance_and_verified_signature(client, registry):
    resp = client.get("/adapters/fog-roads")
    assert resp.status_code == 200
    page = resp.text
    assert '<span class="ok">verified</span>' in page
    assert registry[1] in page and "active" in page
    assert "Harbour lab &lt;b&gt;&amp;&lt;/b&gt;" in page  # the key's label, escaped
    for text in ("foggy highway driving", "semla-tiny", "3.3.0", bundle_factory.FINGERPRINT, "learning rate",
                 "min samples", "road", "building", "rank / alpha", "4 / 8", "embedding model",
                 "adapter_model.safetensors", "manifest.sig", "revocations", "Versions (2, newest first)"):
        assert text in page, text
    assert page.index("<td class=\"num\">v2</td>") < page.index("<td class=\"num\">v1</td>")
    assert '<span id="revocations">none</span>' in page


def test_unknown_or_invalid_name_is_an_html_404(client):
    for path in ("/adapters/no-such-adapter", "/adapters/Bad..Name", "/adapters/%3Cscript%3E"):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert resp.headers["content-type"].startswith("text/html")
        assert "Not found" in resp.text and "<script>" not in resp.text.split("</style>")[0]
    assert "&#x27;no-such-adapter&#x27;" in client.get("/adapters/no-such-adapter").text


def test_publisher_strings_are_escaped(client):
    for path in ("/", "/adapters/harbour-docks", "/?q=harbour"):
        page = client.get(path).text
        assert INJECTION not in page, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
    page = client.get("/", params={"q": '"><script>alert(2)</script>'}).text
    assert "<script>alert(2)" not in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in page


def test_signature_failure_is_shown_in_red(tmp_path):
    app, _ = build_registry(tmp_path / "data", tmp_path, {"night-city": "night"})
    client = TestClient(app)
    service = app.state.service
    path = service.file_path("night-city", 1, ADAPTER_WEIGHTS_FILE)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    page = client.get("/adapters/night-city").text
    assert '<span class="bad">hash_mismatch</span>' in page and "verified</span>" not in page
    # a key taken out of service: the bundle no longer verifies against the active keys
    with app.state.engine.begin() as conn:
        conn.execute(Publisher.__table__.update().values(active=False))
    page = client.get("/adapters/fog-roads").text
    assert '<span class="bad">unknown_key</span>' in page and '<span class="bad">inactive</span>' in page


def test_add_web_routes_is_idempotent(registry):
    app = registry[0]
    before = len(app.router.routes)
    add_web_routes(app)
    add_web_routes(app)
    assert len(app.router.routes) == before
    assert sum(getattr(r, "path", None) == "/" for r in app.router.routes) == 1


def _summary(name: str, vec: list[float], fingerprint: str = "ab" * 32) -> AdapterSummary:
    return AdapterSummary(name=name, version=1, publisher="0" * 16, base_fingerprint=fingerprint, domain=name,
                          sample_count=64, manifest_sha256="0" * 64, centroids=[vec], created_at="")


def test_pca_map_uses_the_most_common_base_only():
    assert pca_map([]) is None
    one = pca_map([_summary("a", [1.0, 0.0])])
    assert one is not None and one["points"][0][1:] == (0.0, 0.0)
    summaries = [_summary("a", [1.0, 0.0, 0.0]), _summary("b", [0.0, 1.0, 0.0]), _summary("c", [0.0, 0.0, 1.0]),
                 _summary("other", [1.0, 0.0], fingerprint="cd" * 32)]
    data = pca_map(summaries)
    assert data["fingerprint"] == "ab" * 32 and data["others"] == 1
    assert [p[0].name for p in data["points"]] == ["a", "b", "c"]
    assert all(-1.0 <= v <= 1.0 for _, x, y in data["points"] for v in (x, y))
    assert abs(sum(data["explained"]) - 1.0) < 1e-9  # three points span a plane
    assert matches_query("Fog  road", "fog-roads", "x") and not matches_query("fog night", "fog-roads", "x")


# -- a real browser -------------------------------------------------------------------------------
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)




def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1280,800",
           *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def browser_url(registry) -> Iterator[str]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the browser checks need it")
    with serve_in_thread(registry[0], lifespan="off") as url:
        yield url


def test_chromium_renders_library_search_and_adapter_page(browser_url, tmp_path, update_goldens):
    dom = chromium(tmp_path / "p1", "--dump-dom", browser_url + "/").stdout
    for name in ADAPTERS:
        assert name in dom
    assert "<svg" in dom and "alert(1)" in dom and INJECTION not in dom  # shown as text, never run

    dom = chromium(tmp_path / "p2", "--dump-dom", browser_url + "/?q=fog").stdout
    assert "fog-roads" in dom and "night-city" not in dom and "harbour-docks" not in dom

    dom = chromium(tmp_path / "p3", "--dump-dom", browser_url + "/adapters/fog-roads").stdout
    assert '<span class="ok">verified</span>' in dom and "foggy highway driving" in dom

    dom = chromium(tmp_path / "p4", "--dump-dom", browser_url + "/adapters/nope").stdout
    assert "Not found" in dom

    png = tmp_path / "registry_page.png"
    chromium(tmp_path / "p5", f"--screenshot={png}", browser_url + "/")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    if update_goldens:  # pytest --update-goldens refreshes the README's screenshot
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, SCREENSHOT)
