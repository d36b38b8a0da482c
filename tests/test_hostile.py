"""One publisher cannot harm the library: every hostile adapter or request is refused with its own
4xx, and neither the registry's state nor a running node's answers change.

The attacker holds one registered publisher key. The stack, on loopback: a registry with two
honest semla-tiny adapters (fog, night; small LoRA factors, centroids from the base's own
embeddings of each domain), a node pulled from it and the node's HTTP service in front.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bundle_factory
import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors
from test_node_serve import png_bytes
from tuf_view import tuf_view

from semla.registry import keys, synth
from semla.registry.basecheck import bundled_cards, check_against_card
from semla.registry.bundle import read_bundle, sign_bundle, write_bundle
from semla.schemas import ADAPTER_WEIGHTS_FILE, Manifest
from semla.schemas.basecard import BaseCard

TOKEN = "hostile-admin-token"
CLASSES = ["sky", "road", "sidewalk", "building", "vegetation", "car", "person", "pole"]
TOP_K = 64  # every adapter of the base is retrieved (and so loaded) for every image


# -- bundles for semla-tiny -----------------------------------------------------------------------
def honest_tensors(card: BaseCard, *, rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Small LoRA factors on the last two blocks (relative effect ~0.05 per layer)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, t in card.targets.items():
        if ".resblocks.2." in module or ".resblocks.3." in module:
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, t.in_features)) / 10).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((t.out_features, rank)) / 100).astype(np.float32)
    return tensors


def tiny_bundle(root: Path, key, name: str, *, tensors: dict[str, np.ndarray], rank: int, alpha: float,
                centroids: list[list[float]], embedding_model: str, fingerprint: str, arch: str = "semla-tiny",
                version: int = 1) -> dict[str, bytes]:
    """A signed bundle (name -> bytes) with exactly these tensors, whatever they are."""
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    fields = bundle_factory.manifest_fields(name=name, version=version, rank=rank, alpha=alpha, domain=name,
                                            modules=dict.fromkeys(modules, (1, 1)))
    fields["base_model"] = {"arch": arch, "tag": "bundled", "open_clip_version": "3.3.0", "fingerprint": fingerprint}
    fields["centroids"] = {"embedding_model": embedding_model, "vectors": centroids}
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=root)) / name
    write_bundle(out, weights=save_safetensors(tensors), manifest_fields=fields,
                 adapter_config={"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules})
    sign_bundle(out, key)
    return read_bundle(out)


def domain_centroid(base, domain: str) -> list[float]:
    import torch

    with torch.no_grad():
        emb = base.embed(base.pixels([synth.render(domain, 99, i)[0] for i in range(6)])).mean(0)
    return [float(x) for x in (emb / emb.norm()).tolist()]


class Ctx:
    """What a hostile bundle is made from: the honest defaults for semla-tiny."""

    def __init__(self, root: Path, key, card: BaseCard, fog: list[float]) -> None:
        self.root, self.key, self.card, self.fog = root, key, card, fog

    def bundle(self, name: str, **change) -> dict[str, bytes]:
        fields = dict(tensors=honest_tensors(self.card, seed=7), rank=4, alpha=8.0, centroids=[self.fog],
                      embedding_model=self.card.embedding.name, fingerprint=self.card.fingerprint)
        fields.update(change)
        return tiny_bundle(self.root, self.key, name, **fields)


def _with(tensors: dict[str, np.ndarray], change: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(change(k, v)).astype(np.float32) for k, v in tensors.items()}


def _one_pair(card: BaseCard, a_shape: tuple[int, int], b_shape: tuple[int, int],
              module: str = "visual.transformer.resblocks.3.attn.v_proj") -> dict[str, np.ndarray]:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": np.full(a_shape, 0.01, np.float32),
            f"{prefix}.lora_B.weight": np.full(b_shape, 0.01, np.float32)}


#: One row per failure class: (bundle builder, exact status, exact code). Issue 11 items 1-3, then ours.
HOSTILE: dict[str, tuple[Callable[[Ctx], dict[str, bytes]], int, str]] = {
    # 1. a centroid of another dimension, same base fingerprint
    "centroid_dimension": (lambda c: c.bundle("h-centroid-dim", centroids=[[1.0, 0.0]]), 422, "centroid_dim"),
    # 2. adapters nodes cannot load
    "shapes_do_not_fit": (lambda c: c.bundle("h-shapes", tensors=_one_pair(c.card, (8, 5), (5, 8)), rank=8),
                          422, "shape_mismatch"),
    "other_embedding_space": (lambda c: c.bundle("h-space", embedding_model="ViT-B-16:0123456789abcdef:clip-global"),
                              422, "embedding_mismatch"),
    "zero_size_tensor": (lambda c: c.bundle("h-empty", tensors=_one_pair(c.card, (8, 0), (96, 8)), rank=8),
                         422, "empty_tensor"),
    # 3. numeric poisoning (config and manifest agree; the centroid far from everything)
    "alpha_1e30": (lambda c: c.bundle("h-alpha", alpha=1e30, centroids=[[-x for x in c.fog]]), 422, "alpha_too_large"),
    "weights_1e18": (lambda c: c.bundle("h-weights", tensors=_with(honest_tensors(c.card), lambda k, v: np.full_like(v, 1e18)),
                                        centroids=[[-x for x in c.fog]]), 422, "value_too_large"),
    "effect_beyond_bound": (lambda c: c.bundle("h-effect", tensors=_with(honest_tensors(c.card), lambda k, v: v * 400)),
                            422, "effect_too_large"),
    # ours: a base the registry has no card of, a card's other fields, bounds, targets
    "unknown_base": (lambda c: c.bundle("h-unknown-base", fingerprint="cd" * 32), 422, "unknown_base"),
    "other_arch_same_fingerprint": (lambda c: c.bundle("h-arch", arch="ViT-B-16"), 422, "base_mismatch"),
    "rank_above_bound": (lambda c: c.bundle("h-rank", tensors=_one_pair(c.card, (300, 96), (96, 300)), rank=300),
                         422, "rank_too_large"),
    "target_the_base_lacks": (lambda c: c.bundle("h-target", tensors=_one_pair(
        c.card, (4, 96), (96, 4), module="visual.transformer.resblocks.9.attn.q_proj")), 422, "unknown_target"),
}


# -- the stack ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_base):
    """Registry (fog, night) → node → node service, all on loopback; plus the attacker's key."""
    from semla.registry.http import RegistryClient
    from semla.registry.node import Node
    from semla.registry.serve import ServeSettings
    from semla.registry.serve import create_app as create_node_app
    from semla.server import ServerSettings
    from semla.server import create_app as create_registry
    from semla.server.local import serve_in_thread

    tmp = tmp_path_factory.mktemp("hostile")
    card = bundled_cards()[tiny_base.ref.fingerprint]
    registry_app = create_registry(ServerSettings(data_dir=tmp / "registry", admin_token=TOKEN, uploads_per_minute=0))
    with serve_in_thread(registry_app) as registry:
        client = RegistryClient(registry)
        owner, attacker = keys.generate_key(), keys.generate_key()
        for key in (owner, attacker):
            client.register_key(keys.public_bytes(key).hex(), TOKEN)
        fog, night = domain_centroid(tiny_base, "fog"), domain_centroid(tiny_base, "night")
        for seed, (name, centroid) in enumerate((("fog", fog), ("night", night))):
            files = tiny_bundle(tmp / "honest", owner, name, tensors=honest_tensors(card, seed=seed), rank=4,
                                alpha=8.0, centroids=[centroid], embedding_model=card.embedding.name,
                                fingerprint=card.fingerprint)
            _upload(registry, files).raise_for_status()
        node = Node(registry, base=copy.deepcopy(tiny_base), cache_dir=tmp / "cache")
        node.pull()
        probes = [synth.render(d, 4242, i)[0] for d in ("fog", "night") for i in range(2)]
        app = create_node_app(node, ServeSettings(max_batch=8, max_wait_ms=5, refresh_seconds=0, top_k=TOP_K))
        with serve_in_thread(app) as node_url:
            answers = _segment(node_url, probes)
            assert [r["contributions"][0]["name"] for r in answers] == ["fog", "fog", "night", "night"]
            yield {"registry": registry, "registry_app": registry_app, "node_url": node_url, "node_app": app,
                   "node": node, "probes": probes, "answers": answers, "card": card,
                   "ctx": Ctx(tmp / "attacker", attacker, card, fog), "fog": fog}


def _upload(url: str, files: dict[str, bytes]) -> httpx.Response:
    parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
    return httpx.post(url + "/v1/adapters", files=parts, timeout=60)


def _segment(node_url: str, images, **fields) -> list[dict]:
    files = [("images", (f"p{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(images)]
    resp = httpx.post(node_url + "/v1/segment", files=files, timeout=120,
                      data={"classes": ",".join(CLASSES), "top_k": str(TOP_K), **fields})
    assert resp.status_code == 200, resp.text
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in resp.json()["results"]]  # timings vary


def registry_state(stack) -> dict:
    """Rows per table, every blob file and the adapter list nodes see through TUF."""
    from sqlalchemy import func, select

    from semla.server.db import Adapter, AdapterFile, Publisher

    app = stack["registry_app"]
    with app.state.engine.connect() as conn:
        rows = {t.__tablename__: conn.scalar(select(func.count()).select_from(t)) for t in (Publisher, Adapter, AdapterFile)}
    blobs = sorted(p.name for p in app.state.blobs.root.rglob("*") if p.is_file())
    with httpx.Client(timeout=30) as http, tempfile.TemporaryDirectory() as node:
        view = tuf_view(http, stack["registry"], Path(node))
        return {"rows": rows, "blobs": blobs, "index": [(a.name, a.version) for a in view.library()],
                "index_version": view.version}


def node_answers_unchanged(stack) -> None:
    """The running node re-pulls the index, then answers the probes exactly as before the attack."""
    worker = stack["node_app"].state.worker
    before = worker.refresh["count"]
    worker.request_refresh()
    start = time.monotonic()
    while worker.refresh["count"] == before and time.monotonic() - start < 60.0:
        time.sleep(0.05)
    assert worker.refresh["count"] > before and worker.refresh["last_error"] is None, worker.refresh
    assert _segment(stack["node_url"], stack["probes"]) == stack["answers"]


# -- the matrix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("row", sorted(HOSTILE))
def test_hostile_upload_is_refused_and_changes_nothing(stack, row):
    build, status, code = HOSTILE[row]
    files = build(stack["ctx"])
    before = registry_state(stack)
    resp = _upload(stack["registry"], files)
    assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
    assert resp.json()["error"]["message"]
    assert registry_state(stack) == before
    node_answers_unchanged(stack)


def _retrieve(stack, **body) -> httpx.Response:
    request = {"embedding": stack["fog"], "base_fingerprint": stack["card"].fingerprint, **body}
    return httpx.post(stack["registry"] + "/v1/retrieve", json=request, timeout=30)


#: Requests (issue 11 items 6 and 7): where they go, what they send, the exact status and code.
HOSTILE_REQUESTS = {
    "class_name_16000_letters": ("node", {"classes": "a" * 16000}, 422, "bad_classes"),
    "256_classes": ("node", {"classes": ",".join(f"c{i}" for i in range(256))}, 422, "bad_classes"),
    "node_temperature_1e-40": ("node", {"temperature": "1e-40"}, 422, "bad_parameter"),
    "node_temperature_nan": ("node", {"temperature": "nan"}, 422, "bad_parameter"),
    "retrieve_temperature_1e-300": ("retrieve", {"temperature": 1e-300}, 422, "invalid_request"),
    "retrieve_temperature_1e300": ("retrieve", {"temperature": 1e300}, 422, "invalid_request"),
    "retrieve_embedding_1e308": ("retrieve", {"embedding": [1e308] * 96}, 422, "invalid_request"),
}


@pytest.mark.parametrize("row", sorted(HOSTILE_REQUESTS))
def test_hostile_request_is_refused_and_changes_nothing(stack, row):
    where, fields, status, code = HOSTILE_REQUESTS[row]
    before = registry_state(stack)
    if where == "node":
        files = [("images", ("p.png", png_bytes(stack["probes"][0]), "image/png"))]
        data = {"classes": ",".join(CLASSES), **fields}
        resp = httpx.post(stack["node_url"] + "/v1/segment", files=files, data=data, timeout=60)
    else:
        resp = _retrieve(stack, **fields)
    assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
    assert registry_state(stack) == before
    node_answers_unchanged(stack)


def test_retrieval_weights_are_finite_at_the_temperature_bounds(stack):
    for temperature in (1e-3, 1e3):
        resp = _retrieve(stack, temperature=temperature)
        assert resp.status_code == 200, resp.text
        weights = [r["weight"] for r in resp.json()["results"]]
        assert all(math.isfinite(w) for w in weights) and math.isclose(sum(weights), 1.0, rel_tol=1e-5)
    big = _retrieve(stack, embedding=[1e6 * x for x in stack["fog"]])  # the largest accepted values
    assert big.status_code == 200 and big.json()["results"][0]["name"] == "fog", big.text


# -- a node under attack --------------------------------------------------------------------------
def test_node_under_attack_answers_honest_domains_unchanged(stack, monkeypatch):
    """The registry's card check is bypassed, so every hostile adapter is stored and listed; the
    node's own check leaves each out (with its reason in /healthz) and answers as before."""
    import semla.server.service.publishing as service

    monkeypatch.setattr(service, "card_for", lambda fingerprint, cards: None)
    monkeypatch.setattr(service, "verify_against_card", lambda card, manifest, weights: {})
    published = []
    for row, (build, _, code) in sorted(HOSTILE.items()):
        files = build(stack["ctx"])
        resp = _upload(stack["registry"], files)
        assert resp.status_code == 201, (row, resp.text)
        manifest = Manifest.parse(files["manifest.json"])
        published.append((manifest.name, code))
        node_answers_unchanged(stack)  # the node re-pulls and answers while the attacker publishes
    monkeypatch.undo()
    health = httpx.get(stack["node_url"] + "/healthz", timeout=30).json()
    excluded = {e["adapter"].split("@")[0]: e["reason"] for e in health["excluded"]}
    on_this_base = {name: code for name, code in published if name != "h-unknown-base"}
    assert set(excluded) == set(on_this_base), health["excluded"]
    for name, code in on_this_base.items():
        assert excluded[name].endswith(f"[{code}]") or code == "centroid_dim", (name, excluded[name])
    assert health["status"] == "ok" and health["adapters"] == 2
    for embedding in (stack["fog"], [1.0] + [0.0] * 95):  # the registry's retrieval never 500s either
        resp = _retrieve(stack, embedding=embedding)
        assert resp.status_code == 200 and all(math.isfinite(r["weight"]) for r in resp.json()["results"]), resp.text


# -- the check itself -----------------------------------------------------------------------------
def test_shipped_card_is_the_bundled_base_s_card(tiny_base):
    from semla.registry.basecard import compute_base_card

    assert bundled_cards()[tiny_base.ref.fingerprint] == compute_base_card(tiny_base)


def test_a_trained_adapter_fits_its_base_card(trained_bundle, tiny_base):
    files = read_bundle(trained_bundle)
    manifest = Manifest.parse(files["manifest.json"])
    report = check_against_card(bundled_cards()[tiny_base.ref.fingerprint], manifest, files[ADAPTER_WEIGHTS_FILE])
    assert report.ok, report.error
    effects = report.effects.values()
    assert set(report.effects) == set(manifest.target_modules)
    assert 0 < max(effects) < 1 and min(effects) >= 0  # layers training never reaches keep B = 0


def test_effect_from_the_factors_equals_the_dense_product(tmp_path):
    card = bundle_factory.base_card()
    files = bundle_factory.make_bundle_files(tmp_path, keys.generate_key(), rank=4, alpha=8.0)
    manifest = Manifest.parse(files["manifest.json"])
    report = check_against_card(card, manifest, files[ADAPTER_WEIGHTS_FILE])
    assert report.ok and set(report.effects) == set(bundle_factory.MODULES)
    from safetensors.numpy import load

    tensors = load(files[ADAPTER_WEIGHTS_FILE])
    for module, effect in report.effects.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        dense = 2.0 * np.linalg.norm(b @ a) / bundle_factory.WEIGHT_NORM
        assert effect == pytest.approx(dense, rel=1e-9)
    tight = check_against_card(bundle_factory.base_card(max_relative_effect=min(report.effects.values()) / 2),
                               manifest, files[ADAPTER_WEIGHTS_FILE])
    assert tight.error is not None and tight.error.code == "effect_too_large"
    assert "visual.transformer.resblocks.0" in tight.error.message  # names the layer


def test_chunked_masks_equal_the_full_argmax(monkeypatch):
    import torch

    from semla.registry import node as node_module

    logits = [torch.randn(7, 5, 5), torch.randn(3, 4, 4)]
    logits[0][2] = logits[0][5]  # a tie: the lower class index wins, as in torch.argmax
    sizes = [(33, 21), (16, 16)]
    full = [torch.nn.functional.interpolate(lg[None], size=s, mode="bilinear", align_corners=False)[0].argmax(0)
            .to(torch.uint8).numpy() for lg, s in zip(logits, sizes)]
    monkeypatch.setattr(node_module, "MAX_UPSAMPLE_ELEMENTS", 2 * 33 * 21)  # two classes per chunk
    for got, want in zip(node_module.Node.masks(logits, sizes), full):
        np.testing.assert_array_equal(got, want)


def test_bases_add_then_an_unknown_base_is_accepted(tmp_path, capsys):
    """An adapter of a base without a card is refused (unknown_base) until the admin adds the card."""
    from fastapi.testclient import TestClient

    from semla.server import ServerSettings, create_app
    from semla.server.cli import main as server_cli

    data_dir, key = tmp_path / "reg", keys.generate_key()
    files = bundle_factory.make_bundle_files(tmp_path, key)
    card_file = tmp_path / "card.json"
    card_file.write_bytes(bundle_factory.base_card().to_json())
    with TestClient(create_app(ServerSettings(data_dir=data_dir, admin_token=TOKEN))) as client:
        client.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
                    headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
        parts = {name: (name, data, "application/octet-stream") for name, data in files.items()}
        refused = client.post("/v1/adapters", files=parts)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_base", refused.text
        capsys.readouterr()
        for bad in (tmp_path / "nope.json", tmp_path / "reg" / "registry.key"):  # missing; not a card
            assert server_cli(["bases", "add", str(bad), "--data-dir", str(data_dir)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("semla-server: error:") and len(err.splitlines()) == 1, err
        assert server_cli(["bases", "add", str(card_file), "--data-dir", str(data_dir)]) == 0
        assert bundle_factory.FINGERPRINT[:16] in capsys.readouterr().out
        assert server_cli(["bases", "list", "--data-dir", str(data_dir)]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert {line.split("\t")[1]: line.split("\t")[-1] for line in listed}[bundle_factory.FINGERPRINT] == "added"
        assert any(line.endswith("\tbundled") for line in listed)  # semla-tiny ships with the package
        assert client.post("/v1/adapters", files=parts).status_code == 201  # no restart needed


def test_base_card_parsing_is_strict():
    from semla.schemas.errors import InvalidInputError

    good = json.loads(bundle_factory.base_card().to_json())
    for bad in ({**good, "extra": 1}, {**good, "bounds": {**good["bounds"], "max_alpha": -1}},
                {**good, "embedding": {"name": "x", "dim": 1}}):
        with pytest.raises(InvalidInputError) as info:
            BaseCard.parse(json.dumps(bad))
        assert info.value.code == "bad_base_card"
    with pytest.raises(InvalidInputError):
        BaseCard.parse(b"[" * 100_000)
