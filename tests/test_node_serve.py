"""The node's HTTP service on loopback: a real registry with two signed adapters, a node on it,
the service in front; concurrent clients are batched and answered exactly as the node would."""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from semla.registry.serve import (
    ServeSettings,
    add_parser,
    create_app,
    decode_png,
    decode_rle,
)
from semla.server.local import serve_in_thread

TOKEN = "serve-test-token"
CLASSES = ["sky", "road", "sidewalk", "building", "vegetation", "car", "person", "pole"]
TEMPERATURE = 1.0  # soft weights: images of a batch get different mixtures (the per-image fusion path)




def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def post(client: httpx.Client, url: str, images: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    files = [("images", (name, data, "image/png")) for name, data in images]
    data = {"classes": ",".join(CLASSES), "temperature": str(TEMPERATURE), **fields}
    if not files:  # still multipart/form-data, with text parts only
        files, data = [(k, (None, v)) for k, v in data.items()], None
    return client.post(url + "/v1/segment", files=files, data=data, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_base, fog_night_library):
    """Registry (fog + night adapters) → node → service (max_batch 16, max_wait 50 ms)."""
    from semla.client.publish import publish_bundle
    from semla.registry import keys, synth
    from semla.registry.http import RegistryClient
    from semla.registry.node import Node
    from semla.server import ServerSettings
    from semla.server import create_app as create_registry

    tmp = tmp_path_factory.mktemp("serve")
    with serve_in_thread(create_registry(ServerSettings(data_dir=tmp / "registry", admin_token=TOKEN))) as registry:
        key = keys.generate_key()
        client = RegistryClient(registry)
        client.register_key(keys.public_bytes(key).hex(), TOKEN)
        for name, shared in fog_night_library.items():
            publish_bundle(shutil.copytree(shared, tmp / name), client, key=key)  # the shared bundles stay unsigned

        node = Node(registry, base=copy.deepcopy(tiny_base), cache_dir=tmp / "cache")
        node.pull()
        images = [synth.render(domain, 4242, i)[0] for i in range(8) for domain in ("fog", "night")]
        # the reference, computed before the service owns the node
        reference = node.segment(images, CLASSES, temperature=TEMPERATURE)
        settings = ServeSettings(max_batch=16, max_wait_ms=50, max_images=4, max_upload_bytes=1024 * 1024,
                                 refresh_seconds=0)
        app = create_app(node, settings)
        with serve_in_thread(app) as url:
            yield {"url": url, "app": app, "images": images, "reference": reference}


def test_concurrent_clients_are_batched_and_answered_like_the_node(stack):
    images, reference, url = stack["images"], stack["reference"], stack["url"]
    barrier = threading.Barrier(8)
    answers: dict[int, httpx.Response] = {}

    def client(t: int) -> None:
        pair = [(f"img{2 * t + j}.png", png_bytes(images[2 * t + j])) for j in range(2)]
        with httpx.Client() as http:
            barrier.wait(timeout=10)
            answers[t] = post(http, url, pair)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)

    assert sorted(answers) == list(range(8))
    sizes = []
    for t, response in answers.items():
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["image"] for r in results] == [f"img{2 * t}.png", f"img{2 * t + 1}.png"]
        for j, row in enumerate(results):
            ref = reference[2 * t + j]
            assert row["classes"] == CLASSES and (row["height"], row["width"]) == ref.mask.shape
            np.testing.assert_array_equal(decode_png(row["mask_png"]), ref.mask)
            assert [(c["name"], c["version"]) for c in row["contributions"]] == \
                [(c.name, c.version) for c in ref.contributions]
            assert [c["weight"] for c in row["contributions"]] == \
                pytest.approx([c.weight for c in ref.contributions], abs=1e-5)
            assert sum(c["weight"] for c in row["contributions"]) == pytest.approx(1.0)
            assert row["timings_ms"]["queue"] >= 0 and row["timings_ms"]["compute"] > 0
            sizes.append(row["timings_ms"]["batch_size"])
    assert max(sizes) > 1, f"no dynamic batching happened: batch sizes {sizes}"
    assert max(sizes) <= 16
    health = httpx.get(url + "/healthz").json()
    assert health["images_served"] >= 16 and health["batches_served"] < health["images_served"]


def test_png_and_rle_decode_to_the_same_mask(stack):
    image, ref = stack["images"][3], stack["reference"][3]
    with httpx.Client() as http:
        as_png = post(http, stack["url"], [("a.png", png_bytes(image))]).json()["results"][0]
        as_rle = post(http, stack["url"], [("a.png", png_bytes(image))], format="rle").json()["results"][0]
    assert "rle" not in as_png and "mask_png" not in as_rle
    assert set(as_rle["rle"]) == set(CLASSES)
    from_rle = decode_rle(as_rle["rle"], as_rle["classes"], as_rle["height"], as_rle["width"])
    np.testing.assert_array_equal(from_rle, decode_png(as_png["mask_png"]))
    np.testing.assert_array_equal(from_rle, ref.mask)
    covered = sum(length for runs in as_rle["rle"].values() for _, length in runs)
    assert covered == as_rle["height"] * as_rle["width"]


def _refused(stack, images, **fields) -> tuple[int, str]:
    with httpx.Client() as http:
        response = post(http, stack["url"], images, **fields)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return response.status_code, body["error"]["code"]


@pytest.mark.parametrize(
    "make, fields, expected",
    [
        (lambda png: [("x.png", b"this is not an image")], {}, (422, "bad_image")),
        (lambda png: [("cut.png", png[:120])], {}, (422, "bad_image")),
        (lambda png: [("ok.png", png)], {"classes": " , ,"}, (422, "empty_classes")),
        (lambda png: [("ok.png", png)], {"classes": "sky,sky"}, (422, "bad_classes")),
        (lambda png: [], {}, (422, "no_images")),
        (lambda png: [("ok.png", png)], {"top_k": "0"}, (422, "bad_parameter")),
        (lambda png: [("ok.png", png)], {"top_k": "two"}, (422, "bad_parameter")),
        (lambda png: [("ok.png", png)], {"temperature": "-1"}, (422, "bad_parameter")),
        (lambda png: [("ok.png", png)], {"format": "jpeg"}, (422, "bad_parameter")),
        (lambda png: [(f"{i}.png", png) for i in range(5)], {}, (413, "too_large")),
        (lambda png: [("big.png", bytes(1024 * 1024 + 1))], {}, (413, "too_large")),
    ],
    ids=["not-image", "truncated", "empty-classes", "duplicate-classes", "no-images", "top-k-0", "top-k-text",
         "negative-temperature", "bad-format", "too-many-images", "too-many-bytes"],
)
def test_bad_requests_are_refused_with_a_code(stack, make, fields, expected):
    assert _refused(stack, make(png_bytes(stack["images"][0])), **fields) == expected


def test_a_refused_request_does_not_disturb_the_service(stack):
    with httpx.Client() as http:
        assert post(http, stack["url"], [("x.png", b"junk")]).status_code == 422
        ok = post(http, stack["url"], [("a.png", png_bytes(stack["images"][5]))])
    assert ok.status_code == 200
    np.testing.assert_array_equal(decode_png(ok.json()["results"][0]["mask_png"]), stack["reference"][5].mask)


def test_healthz_reports_the_node_and_the_service(stack):
    response = httpx.get(stack["url"] + "/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["adapters"] == 2 and body["worker_alive"] is True
    assert {"queue", "batches_served", "images_served", "batch_sizes", "refresh"} <= set(body)
    assert body["refresh"]["enabled"] is False


def test_openapi_describes_the_multipart_segment_route(stack):
    spec = httpx.get(stack["url"] + "/openapi.json").json()
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["images", "classes"] and body["properties"]["images"]["type"] == "array"
    assert "/healthz" in spec["paths"]
    assert httpx.get(stack["url"] + "/docs").status_code == 200
    missing = httpx.get(stack["url"] + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# -- the worker, with a stand-in node (no model): one thread, refresh failures survived ------------
class FakeNode:
    """Records which thread calls it; the first two pulls fail, ``classes=expired`` expires."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.pulls = 0
        self.offline = False

    def pull(self) -> list:
        from semla.schemas.errors import RegistryError

        self.threads.add(threading.get_ident())
        self.pulls += 1
        if self.pulls <= 2:
            raise RegistryError("registry down", code="unreachable")
        return []

    def health(self) -> dict:
        self.threads.add(threading.get_ident())
        return {"status": "ok", "adapters": 1}

    def segment(self, images, classes, *, top_k, temperature, distance, batch_size, **weighting):
        from semla.registry.node import Contribution, Prediction
        from semla.schemas.errors import IndexExpiredError

        self.threads.add(threading.get_ident())
        if classes[0] == ["expired"]:
            raise IndexExpiredError("index too old")
        return [Prediction(f"image-{i}", c, np.full(im.shape[:2], 1, np.uint8),
                           [Contribution(name="fog", version=1, publisher="k", distance=0.1, weight=1.0)]) for i, (im, c) in enumerate(zip(images, classes))]


def test_worker_owns_the_node_and_survives_failed_refreshes():
    node = FakeNode()
    image = png_bytes(np.zeros((4, 6, 3), np.uint8))
    with TestClient(create_app(node, ServeSettings(refresh_seconds=0.02, max_wait_ms=0))) as client:
        deadline = time.monotonic() + 10
        while node.pulls < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        ok = client.post("/v1/segment", files=[("images", ("a.png", image))], data={"classes": "sky,fog"})
        expired = client.post("/v1/segment", files=[("images", ("a.png", image))], data={"classes": "expired"})
        health = client.get("/healthz").json()
    assert node.pulls >= 3
    assert ok.status_code == 200 and decode_png(ok.json()["results"][0]["mask_png"]).shape == (4, 6)
    assert expired.status_code == 503 and expired.json()["error"]["code"] == "index_expired"
    assert health["refresh"]["failures"] == 2 and health["refresh"]["last_error"] is None
    assert len(node.threads) == 1 and threading.get_ident() not in node.threads


def test_both_services_keep_their_startup_heap_out_of_the_collector(tmp_path):
    """While a service runs, what it loaded sits in the collector's permanent generation (a full
    collection over it stalled every request); stopping it hands that back."""
    import gc

    from semla.server import ServerSettings
    from semla.server import create_app as create_registry

    gc.unfreeze()  # a service another test left running froze the heap too
    for app in (create_app(FakeNode(), ServeSettings(refresh_seconds=60.0)),
                create_registry(ServerSettings(data_dir=tmp_path / "registry", admin_token="t"))):
        assert gc.get_freeze_count() == 0
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            assert gc.get_freeze_count() > 1000
        assert gc.get_freeze_count() == 0


# -- command line -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semla-node")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def test_serve_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["serve", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--registry", "--host", "--port", "--device", "--max-batch", "--max-wait-ms", "--refresh-seconds",
                 "--cache-dir", "/v1/segment"):
        assert flag in text
    args = _parser().parse_args(["serve", "--registry", "http://127.0.0.1:9"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.refresh_seconds) == \
        ("127.0.0.1", 8090, 16, 10.0, 60.0)
    assert callable(args.func)


@pytest.mark.parametrize(
    "extra, code, fragment",
    [(["--device", "tpu"], 2, "device"), (["--max-batch", "0"], 2, "max_batch"), ([], 1, "unreachable")],
)
def test_serve_refuses_with_one_line(tmp_path, capsys, extra, code, fragment):
    from semla.registry.cli_common import run

    argv = ["serve", "--registry", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "cache"), *extra]
    assert run(_parser(), argv, lambda a: a.func(a)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
