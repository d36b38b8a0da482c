"""Tests for the synthetic scene generator and its benchmark domains (semla.registry.synth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from semla.registry import synth
from semla.registry.names import Registry
from semla.schemas.errors import UnknownNameError

REQUIRED_DOMAINS = {"clear", "fog", "night", "rain", "snow", "sepia"}
SIZE = 64


def _domains_of(scene: str) -> list[str]:
    return [d for d in synth.list_domains() if synth.get_domain(d).scene == scene]


def _clean_domain(scene: str) -> str:
    (clean,) = [d for d in _domains_of(scene) if synth.get_domain(d).shifts == ("none",)]
    return clean


def _float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


# --- registries ---------------------------------------------------------------------


def test_required_domains_and_street_classes():
    assert REQUIRED_DOMAINS <= set(synth.list_domains())
    assert synth.list_domains() == sorted(synth.DOMAINS)
    assert "street" in synth.list_scenes()
    assert {"none", "fog", "night", "rain", "snow", "sepia"} <= set(synth.list_shifts())
    classes = synth.get_scene("street").classes
    assert len(classes) >= 6
    assert {"sky", "road", "building", "vegetation", "car", "person"} <= set(classes)
    for name in REQUIRED_DOMAINS:
        dom = synth.get_domain(name)
        assert dom.scene == "street"
        assert isinstance(dom.shifts, tuple) and dom.shifts
        assert dom.description
    assert synth.get_domain("clear").shifts == ("none",)


def test_get_domain_unknown_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        synth.get_domain("no-such-domain")
    msg = str(info.value)
    assert "no-such-domain" in msg
    for name in REQUIRED_DOMAINS:
        assert name in msg
    with pytest.raises(UnknownNameError, match="valid"):
        synth.render("no-such-domain", 0, 0, SIZE)


def test_duplicate_registration_raises():
    scene = synth.get_scene("street")
    with pytest.raises(ValueError, match="already registered"):
        synth.register_scene(synth.Scene("street", scene.classes, scene.render))
    with pytest.raises(ValueError, match="already registered"):
        synth.register_shift(synth.Shift("fog", "again", lambda rgb, rng: rgb))
    with pytest.raises(ValueError, match="already registered"):
        synth.register_domain(synth.Domain("clear", "street", ("none",), "again"))
    assert synth.get_domain("clear").shifts == ("none",)


def test_register_domain_rejects_unknown_parts(monkeypatch):
    fresh = Registry("domain")  # a refused registration must not leak; if it did, only into this copy
    fresh.update(synth.DOMAINS)
    monkeypatch.setattr(synth.registry, "DOMAINS", fresh)
    with pytest.raises(ValueError, match="scene"):
        synth.register_domain(synth.Domain("x1", "no-scene", ("none",), "bad"))
    with pytest.raises(ValueError, match="shift"):
        synth.register_domain(synth.Domain("x2", "street", ("no-shift",), "bad"))


def test_composed_domain_keeps_layout():
    assert synth.get_domain("fog_night").shifts == ("fog", "night", "bloom")
    combo_rgb, combo_mask = synth.render("fog_night", 4, 2, SIZE)
    night_rgb, _ = synth.render("night", 4, 2, SIZE)
    clear_rgb, clear_mask = synth.render("clear", 4, 2, SIZE)
    np.testing.assert_array_equal(combo_mask, clear_mask)
    assert not np.array_equal(combo_rgb, night_rgb)
    assert not np.array_equal(combo_rgb, clear_rgb)


# --- rendering ----------------------------------------------------------------------


def test_render_shapes_and_dtypes():
    for size in (16, 33, 96):
        rgb, mask = synth.render("clear", 0, 0, size)
        assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
    with pytest.raises(ValueError):
        synth.render("clear", 0, 0, 15)
    with pytest.raises(ValueError):
        synth.render("clear", -1, 0, SIZE)


@pytest.mark.parametrize("domain", synth.list_domains())
def test_render_is_deterministic(domain):
    rgb1, mask1 = synth.render(domain, 7, 3, SIZE)
    rgb2, mask2 = synth.render(domain, 7, 3, SIZE)
    assert rgb1.tobytes() == rgb2.tobytes()
    assert mask1.tobytes() == mask2.tobytes()
    rgb3, mask3 = synth.render(domain, 8, 3, SIZE)
    assert rgb1.tobytes() != rgb3.tobytes()
    assert mask1.tobytes() != mask3.tobytes()
    rgb4, _ = synth.render(domain, 7, 4, SIZE)
    assert rgb1.tobytes() != rgb4.tobytes()


@pytest.mark.parametrize("scene", synth.list_scenes())
def test_shifts_keep_the_layout_in_every_domain(scene):
    clean = _clean_domain(scene)
    for index in range(3):
        clean_rgb, clean_mask = synth.render(clean, 11, index, SIZE)
        for domain in _domains_of(scene):
            if domain == clean:
                continue
            rgb, mask = synth.render(domain, 11, index, SIZE)
            np.testing.assert_array_equal(mask, clean_mask, err_msg=domain)
            assert not np.array_equal(rgb, clean_rgb), domain


def test_mask_values_and_class_coverage():
    classes = synth.get_scene("street").classes
    n = 50
    present = np.zeros(len(classes), dtype=int)
    for index in range(n):
        _, mask = synth.render("clear", 0, index, SIZE)
        assert int(mask.max()) < len(classes)
        present += np.bincount(mask.ravel(), minlength=len(classes))[: len(classes)] > 0
    missing = [c for c, k in zip(classes, present) if k == 0]
    assert not missing, f"classes never rendered: {missing}"
    for name in ("sky", "road", "building"):
        assert present[classes.index(name)] >= 0.9 * n, name


def test_shifts_really_shift():
    n = 6
    clear = [_float(synth.render("clear", 2, i, SIZE)[0]) for i in range(n)]
    shifted = {
        d: [_float(synth.render(d, 2, i, SIZE)[0]) for i in range(n)]
        for d in sorted(REQUIRED_DOMAINS - {"clear"})
    }
    for domain, imgs in shifted.items():
        mad = np.mean([np.abs(a - b).mean() for a, b in zip(clear, imgs)])
        assert mad > 0.08, f"{domain}: mean abs diff to clear only {mad:.3f}"

    def mean(imgs):
        return float(np.mean([x.mean() for x in imgs]))

    def std(imgs):
        return float(np.mean([x.std() for x in imgs]))

    assert mean(shifted["night"]) < 0.5 * mean(clear)
    assert std(shifted["fog"]) < 0.6 * std(clear)
    assert mean(shifted["fog"]) > mean(clear)
    assert mean(shifted["snow"]) > mean(clear) + 0.1
    assert mean(shifted["rain"]) < mean(clear)
    sepia = np.stack(shifted["sepia"]).reshape(-1, 3).mean(axis=0)
    assert sepia[0] > sepia[1] > sepia[2] + 0.05  # warm brown cast


def test_none_shift_is_identity():
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    out = synth.get_shift("none").apply(rgb, np.random.default_rng(1))
    np.testing.assert_array_equal(out, rgb)


def test_every_shift_keeps_shape_and_range():
    rgb = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    for name in synth.list_shifts():
        out = synth.get_shift(name).apply(rgb.copy(), np.random.default_rng(3))
        assert out.shape == rgb.shape, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name


def test_new_shifts_do_what_they_say():
    n = 6
    clear = [_float(synth.render("clear", 2, i, SIZE)[0]) for i in range(n)]
    shifted = {d: [_float(synth.render(d, 2, i, SIZE)[0]) for i in range(n)]
               for d in ("blur", "noise", "lowres", "cast")}

    def mean(imgs, axis=None):
        return np.mean([x.mean(axis=axis) if axis is None else x.reshape(-1, 3).mean(0) for x in imgs], axis=0)

    def grad(imgs, axis):
        return float(np.mean([np.abs(np.diff(x.mean(-1), axis=axis)).mean() for x in imgs]))

    def flat_steps(imgs):  # share of neighbours with exactly the same value
        return float(np.mean([(np.diff(x.mean(-1), axis=1) == 0).mean() for x in imgs]))

    assert grad(shifted["blur"], 1) < 0.6 * grad(clear, 1)  # horizontal detail smeared
    assert grad(shifted["noise"], 1) > 2.0 * grad(clear, 1)
    assert flat_steps(shifted["lowres"]) > 0.5 > 3 * flat_steps(clear)  # blocky pixels
    r, g, b = mean(shifted["cast"], axis=-1)
    assert g > r + 0.1 and g > b  # green-teal, unlike sepia
    indoor = [_float(synth.render("indoor", 2, i, SIZE)[0]) for i in range(n)]
    warm = mean([_float(synth.render("indoor_warm", 2, i, SIZE)[0]) for i in range(n)], axis=-1)
    assert warm[0] > warm[2] + 0.2
    dim = [_float(synth.render("indoor_dim", 2, i, SIZE)[0]) for i in range(n)]
    assert mean(dim) < 0.6 * mean(indoor)
    harbour = [_float(synth.render("harbour", 2, i, SIZE)[0]) for i in range(n)]
    dusk = [_float(synth.render("harbour_dusk", 2, i, SIZE)[0]) for i in range(n)]
    assert mean(dusk) < mean(harbour)
    fields = [_float(synth.render("fields", 2, i, SIZE)[0]) for i in range(n)]
    haze = [_float(synth.render("fields_haze", 2, i, SIZE)[0]) for i in range(n)]
    assert mean(haze) > mean(fields) and grad(haze, 0) < grad(fields, 0)


# --- scenes and the benchmark -------------------------------------------------------

SCENE_CLASSES = {
    "street": {"sky", "road", "building", "vegetation", "car", "person"},
    "indoor": {"wall", "floor", "ceiling", "window", "door", "table", "chair", "person"},
    "harbour": {"sky", "water", "boat", "pier", "building", "person"},
    "fields": {"sky", "field", "vegetation", "road", "fence", "animal", "person"},
}
# classes that fill most of every picture of their scene
BACKDROP = {"indoor": ("wall", "floor", "ceiling"), "harbour": ("sky", "water", "pier"),
            "fields": ("sky", "field", "vegetation")}


def test_scenes_and_their_classes():
    assert set(synth.list_scenes()) == set(SCENE_CLASSES)
    for scene, expected in SCENE_CLASSES.items():
        assert expected <= set(synth.get_scene(scene).classes), scene
        assert synth.get_domain(_clean_domain(scene)).scene == scene
    street = set(synth.STREET_CLASSES)
    for scene in ("indoor", "harbour", "fields"):
        assert set(synth.get_scene(scene).classes) & street, f"{scene} shares no class with street"
    assert {"sky", "building"} <= set(synth.HARBOUR_CLASSES) & street
    assert {"sky", "road", "vegetation"} <= set(synth.FIELDS_CLASSES) & street
    assert all("person" in synth.get_scene(s).classes for s in SCENE_CLASSES)


@pytest.mark.parametrize("scene", sorted(BACKDROP))
def test_new_scene_masks_and_class_coverage(scene):
    classes = synth.get_scene(scene).classes
    n = 40
    present = np.zeros(len(classes), dtype=int)
    for index in range(n):
        _, mask = synth.render(_clean_domain(scene), 0, index, SIZE)
        assert mask.dtype == np.uint8 and int(mask.max()) < len(classes)
        present += np.bincount(mask.ravel(), minlength=len(classes)) > 0
    share = dict(zip(classes, present / n))
    rare = {c: s for c, s in share.items() if s < 0.3}
    assert not rare, f"{scene}: classes in under 30% of images: {rare}"
    for name in BACKDROP[scene]:
        assert share[name] >= 0.9, (scene, name, share[name])


def test_benchmark_domains():
    bench = synth.benchmark_domains()
    assert len(bench) == 20 == len(set(bench))
    assert bench == synth.benchmark_domains() == list(synth.BENCHMARK_DOMAINS)  # a fixed order
    assert set(bench) <= set(synth.list_domains())
    scenes = [synth.get_domain(d).scene for d in bench]
    assert scenes[:12] == ["street"] * 12
    assert scenes[12:].count("street") == 0 and set(scenes[12:]) == {"indoor", "harbour", "fields"}
    weather_time = {"clear", "night", "fog", "rain", "snow", "fog_night", "rain_night", "snow_night"}
    assert set(bench[:8]) == weather_time
    assert "clear" in bench  # the clean street domain is a benchmark domain ...
    for scene in ("indoor", "harbour", "fields"):  # ... the other clean source domains are not
        assert _clean_domain(scene) not in bench
    for name in bench[1:]:
        assert synth.get_domain(name).shifts != ("none",), name
    assert len({synth.get_domain(d).shifts for d in bench[8:12]}) == 4  # four camera shifts


def test_split_seeds():
    seeds = {d: synth.split_seeds(d) for d in synth.list_domains()}
    assert seeds == {d: synth.split_seeds(d) for d in synth.list_domains()}
    flat = [s for pair in seeds.values() for s in pair]
    assert len(flat) == len(set(flat))  # train != test, and no two domains share a seed
    assert all(s >= 0 for s in flat)
    train, test = synth.split_seeds("harbour_fog")
    assert synth.render("harbour_fog", train, 0, SIZE)[1].tobytes() != \
        synth.render("harbour_fog", test, 0, SIZE)[1].tobytes()
    with pytest.raises(UnknownNameError, match="valid"):
        synth.split_seeds("no-such-domain")


def _features(img: np.ndarray) -> np.ndarray:
    """Mean colour, contrast, horizontal and vertical detail, share of flat steps."""
    x = _float(img)
    g = x.mean(-1)
    dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    return np.array([*x.reshape(-1, 3).mean(0), g.std(), dx.mean(), dy.mean(), (dx == 0).mean()])


@pytest.mark.parametrize("scene", synth.list_scenes())
def test_domains_of_a_scene_look_different(scene):
    """Every two domains of one scene differ by > 2 pooled standard deviations in a simple statistic."""
    feats = {d: np.stack([_features(synth.render(d, synth.split_seeds(d)[1], i, SIZE)[0]) for i in range(20)])
             for d in _domains_of(scene)}
    names = sorted(feats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pooled = np.sqrt((feats[a].var(0) + feats[b].var(0)) / 2) + 1e-6
            z = np.abs(feats[a].mean(0) - feats[b].mean(0)) / pooled
            assert z.max() > 2.0, f"{a} and {b} look alike (max separation {z.max():.2f})"


def test_contact_sheet(tmp_path):
    out = synth.contact_sheet(["clear", "harbour_dusk"], tmp_path / "sheet" / "s.png", n=2, size=32, seed=3)
    with Image.open(out) as img:
        assert img.mode == "RGB"
        width, height = img.size
        sheet = np.asarray(img)
    assert width > 4 * 32 and height > 2 * 32
    rgb, _ = synth.render("harbour_dusk", 3, 1, 32)
    assert any(np.array_equal(sheet[y:y + 32, x:x + 32], rgb) for y in range(height - 31) for x in range(width - 31)
               if (sheet[y, x] == rgb[0, 0]).all())
    assert synth.main(["--sheet", str(tmp_path / "m.png"), "--domains", "indoor", "--n", "1", "--size", "16",
                       "--colours", "64"]) == 0
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and len(img.getcolors()) <= 64


# --- write_dataset ------------------------------------------------------------------


def test_write_dataset_layout(tmp_path):
    out = tmp_path / "data" / "fog"
    result = synth.write_dataset("fog", 3, 5, out, size=32)
    assert result == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "domain.json", "images",
                                                     "masks"]
    names = ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    assert sorted(p.name for p in (out / "masks").iterdir()) == names
    classes = synth.get_scene("street").classes
    assert (out / "classes.txt").read_text(encoding="utf-8") == "\n".join(classes) + "\n"
    meta = json.loads((out / "domain.json").read_text(encoding="utf-8"))
    assert meta == {"domain": "fog", "scene": "street", "shifts": ["fog"], "seed": 5, "n": 3,
                    "size": 32}
    for i, name in enumerate(names):
        with Image.open(out / "images" / name) as img:
            assert img.mode == "RGB" and img.size == (32, 32)
            rgb = np.asarray(img)
        with Image.open(out / "masks" / name) as m:
            assert m.mode == "L" and m.size == (32, 32)
            mask = np.asarray(m)
        exp_rgb, exp_mask = synth.render("fog", 5, i, 32)
        np.testing.assert_array_equal(rgb, exp_rgb)
        np.testing.assert_array_equal(mask, exp_mask)
    assert [p.name for p in out.parent.iterdir()] == ["fog"]  # no temp dir left behind


def test_write_dataset_into_empty_existing_dir(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    synth.write_dataset("clear", 1, 0, out, size=16)
    assert (out / "images" / "00000.png").is_file()


def test_write_dataset_refuses_non_empty(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="taken"):
        synth.write_dataset("clear", 1, 0, out, size=16)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_write_dataset_validates_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth.write_dataset("clear", 0, 0, tmp_path / "a", size=32)
    with pytest.raises(ValueError):
        synth.write_dataset("clear", 1, 0, tmp_path / "b", size=15)
    with pytest.raises(UnknownNameError):
        synth.write_dataset("nope", 1, 0, tmp_path / "c", size=32)
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_cleans_up_after_failure(tmp_path, monkeypatch):
    real_render = synth.render
    calls = []

    def flaky(domain, seed, index, size=96):
        calls.append(index)
        if index == 2:
            raise RuntimeError("boom")
        return real_render(domain, seed, index, size)

    monkeypatch.setattr(synth.writer, "render", flaky)  # where write_dataset looks it up
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        synth.write_dataset("rain", 4, 0, out, size=16)
    assert calls == [0, 1, 2]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_progress_bar(tmp_path, capsys):
    synth.write_dataset("snow", 2, 0, tmp_path / "p", size=16, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2/2" in captured.err
