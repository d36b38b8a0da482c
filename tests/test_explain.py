"""``explain``: base vs fused masks, leave-one-out attribution, the picture, the JSON and the CLI,
against a real registry on loopback holding two signed adapters (fog, night)."""

from __future__ import annotations

import argparse
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semla.registry import keys, synth
from semla.registry.cli_common import run
from semla.registry.explain import add_parser, explain, render, to_json
from semla.registry.node import Node, Retrieval
from semla.schemas.errors import InvalidInputError
from semla.server.local import local_registry

TOKEN = "explain-admin-token"
CLASSES = list(synth.get_scene("street").classes)


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory, fog_night_library):
    """A ``semla-server`` on a free loopback port with fog v1 and night v1, signed by one owner."""
    from semla.client.publish import publish_bundle
    from semla.registry.bundle import sign_bundle
    from semla.registry.http import RegistryClient

    work = tmp_path_factory.mktemp("explain")
    with local_registry(work / "reg", TOKEN) as url:
        client = RegistryClient(url)
        key = keys.generate_key()
        client.register_key(keys.public_bytes(key).hex(), TOKEN, label="explain tests")
        for name, shared in fog_night_library.items():
            bundle = shutil.copytree(shared, work / name)  # the shared bundles stay unsigned
            sign_bundle(bundle, key)
            publish_bundle(bundle, client)
        yield url


@pytest.fixture(scope="module")
def node(registry_url, tiny_base, tmp_path_factory):
    node = Node(registry_url, base=copy.deepcopy(tiny_base), cache_dir=tmp_path_factory.mktemp("node-cache"))
    node.pull()
    return node


@pytest.fixture(scope="module")
def fog_image() -> np.ndarray:
    return synth.render("fog", 5000, 0)[0]


@pytest.fixture(scope="module")
def explained(node, fog_image):
    return explain(node, fog_image, CLASSES, top_k=2)


def _margin_drop(fused: torch.Tensor, left_out: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Independent margin drop: numpy on upsampled logits (C, H, W), winner = fused argmax."""
    up = [F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0].numpy() for t in (fused, left_out)]
    winner = up[0].argmax(0)

    def margin(logits: np.ndarray) -> np.ndarray:
        win = np.take_along_axis(logits, winner[None], 0)[0]
        other = logits.copy()
        np.put_along_axis(other, winner[None], -np.inf, 0)
        return win - other.max(0)

    return margin(up[0]) - margin(up[1])


def test_masks_are_what_segment_returns(node, fog_image, explained):
    pred = node.segment([fog_image], CLASSES, top_k=2, with_base=True)[0]

    np.testing.assert_array_equal(explained.fused_mask, pred.mask)
    np.testing.assert_array_equal(explained.base_mask, pred.base_mask)
    assert explained.contributions == pred.contributions
    np.testing.assert_array_equal(explained.changed, pred.base_mask != pred.mask)
    assert explained.changed.any() and not explained.changed.all()


def test_attribution_is_minus_one_outside_changes_and_a_contribution_inside(explained):
    k = len(explained.contributions)
    assert k == 2
    att, changed = explained.attribution, explained.changed
    assert att.shape == changed.shape == (96, 96)
    assert (att[~changed] == -1).all()
    assert ((att[changed] >= 0) & (att[changed] < k)).all()
    assert sum(s.attributed_share for s in explained.stats) == pytest.approx(1.0)
    assert explained.stats[0].attributed_share > 0.5  # fog v1 is the near adapter of a fog image


def test_attribution_agrees_with_an_independent_leave_one_out(node, fog_image, explained):
    pixels, query = node.embed([fog_image])
    text = node.text(CLASSES)
    retrieval = node.retrieve(query, top_k=2)
    fused = node.logits(node.fused_dense(pixels, retrieval), [text])[0]
    drops = []
    for i in range(2):
        weights = retrieval.weights.clone()
        weights[0, i] = 0
        if weights.sum() > 0:
            weights /= weights.sum()
        else:  # the other weight underflowed: it alone, at weight 1
            weights[0, 1 - i] = 1
        left_out = node.logits(node.fused_dense(pixels, Retrieval(retrieval.idx, retrieval.dist, weights)), [text])[0]
        drops.append(_margin_drop(fused, left_out, (96, 96)))
    drops = np.stack(drops)

    np.testing.assert_allclose(explained.margin_drop, drops, atol=1e-3)
    decided = explained.changed & (np.abs(drops[0] - drops[1]) > 1e-2)  # away from float ties
    assert decided.sum() > 0.9 * explained.changed.sum()
    np.testing.assert_array_equal(explained.attribution[decided], drops.argmax(0)[decided])


def test_top_k_1_gives_every_change_to_the_one_adapter(node):
    image = synth.render("night", 5000, 1)[0]
    e = explain(node, image, CLASSES, top_k=1)

    assert [c.name for c in e.contributions] == ["night"] and e.contributions[0].weight == pytest.approx(1.0)
    assert e.changed.any()
    assert (e.attribution[e.changed] == 0).all() and (e.attribution[~e.changed] == -1).all()
    assert e.stats[0].attributed_share == 1.0
    assert (e.margin_drop[0][e.changed] > 0).all()  # left out = base, which picked another class there


def test_json_has_the_same_numbers(explained):
    doc = json.loads(json.dumps(to_json(explained, "fog.png", CLASSES), allow_nan=False))

    assert doc["image"] == "fog.png" and doc["classes"] == CLASSES and doc["size"] == [96, 96]
    assert sum(c["weight"] for c in doc["contributions"]) == pytest.approx(1.0)
    assert [c["name"] for c in doc["contributions"]] == [c.name for c in explained.contributions]
    assert doc["changed_share"] == pytest.approx(explained.changed.mean(), abs=1e-6)
    assert sum(c["attributed_share"] for c in doc["contributions"]) == pytest.approx(1.0, abs=1e-5)
    assert doc["contributions"][0]["mean_margin_drop"] > 0
    assert [r["class"] for r in doc["class_pixels"]] == CLASSES
    assert sum(r["base"] for r in doc["class_pixels"]) == sum(r["fused"] for r in doc["class_pixels"]) == 96 * 96
    moved = sum(abs(r["fused"] - r["base"]) for r in doc["class_pixels"])
    assert 0 < moved <= 2 * doc["changed_pixels"]


def test_render_is_one_legible_rgb_picture(explained, fog_image):
    picture = render(explained, fog_image, CLASSES)

    assert picture.mode == "RGB"
    assert picture.width > 4 * fog_image.shape[1] and picture.height > 3 * fog_image.shape[0]
    colours = {tuple(c) for c in np.asarray(picture).reshape(-1, 3)[::7]}
    assert len(colours) > 20
    from semla.registry.cli import palette
    from semla.registry.explain import adapter_colours

    present = {tuple(int(v) for v in c) for c in palette(len(CLASSES))[np.unique(explained.fused_mask)]}
    present |= {tuple(int(v) for v in adapter_colours(2)[0])}
    assert present <= {tuple(int(v) for v in c) for c in np.asarray(picture).reshape(-1, 3)}


def _node_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semla-node")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_a_picture_and_json_per_image(registry_url, tmp_path, capsys):
    images = []
    for domain in ("fog", "night"):
        path = tmp_path / f"{domain}.png"
        Image.fromarray(synth.render(domain, 5000, 2)[0]).save(path)
        images.append(str(path))
    out = tmp_path / "out"

    code = run(_node_parser(), ["explain", *images, "--registry", registry_url, "--classes", ",".join(CLASSES),
                                "--out", str(out), "--top-k", "2", "--cache-dir", str(tmp_path / "cache")],
               lambda args: args.func(args))

    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(images[0]) and "changed" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["fog.explain.json", "fog.explain.png",
                                                     "night.explain.json", "night.explain.png"]
    doc = json.loads((out / "night.explain.json").read_text())
    assert doc["image"] == images[1] and doc["contributions"][0]["name"] == "night"
    with Image.open(out / "night.explain.png") as picture:
        assert picture.mode == "RGB" and picture.width > 4 * 96


def test_cli_bad_image_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = run(_node_parser(), ["explain", str(tmp_path / "none.png"), "--registry", "http://127.0.0.1:9",
                                "--classes", "sky,road", "--out", str(tmp_path / "out")], lambda args: args.func(args))

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image, classes, top_k", [
    (np.zeros((8, 8), np.uint8), CLASSES, 2),
    (np.zeros((8, 8, 3), np.float32), CLASSES, 2),
    (np.zeros((8, 8, 3), np.uint8), [], 2),
    (np.zeros((8, 8, 3), np.uint8), CLASSES, 0),
])
def test_bad_arguments_are_invalid_input(node, image, classes, top_k):
    with pytest.raises(InvalidInputError):
        explain(node, image, classes, top_k=top_k)
