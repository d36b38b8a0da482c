"""Tests for the synthetic street-scene generator (semla.registry.synth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from semla.registry import synth

REQUIRED_DOMAINS = {"clear", "fog", "night", "rain", "snow", "sepia"}
SIZE = 64


def _street_domains() -> list[str]:
    return [d for d in synth.list_domains() if synth.get_domain(d).scene == "street"]


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
    with pytest.raises(KeyError) as info:
        synth.get_domain("no-such-domain")
    msg = str(info.value)
    assert "no-such-domain" in msg
    for name in REQUIRED_DOMAINS:
        assert name in msg
    with pytest.raises(KeyError, match="valid"):
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
    monkeypatch.setattr(synth, "DOMAINS", dict(synth.DOMAINS))
    with pytest.raises(ValueError, match="scene"):
        synth.register_domain(synth.Domain("x1", "no-scene", ("none",), "bad"))
    with pytest.raises(ValueError, match="shift"):
        synth.register_domain(synth.Domain("x2", "street", ("no-shift",), "bad"))


def test_composed_domain_keeps_layout(monkeypatch):
    monkeypatch.setattr(synth, "DOMAINS", dict(synth.DOMAINS))
    synth.register_domain(synth.Domain("fog_night", "street", ("fog", "night"), "foggy night"))
    assert "fog_night" in synth.list_domains()
    combo_rgb, combo_mask = synth.render("fog_night", 4, 2, SIZE)
    night_rgb, night_mask = synth.render("night", 4, 2, SIZE)
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


@pytest.mark.parametrize("domain", sorted(REQUIRED_DOMAINS))
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


def test_same_layout_in_every_domain():
    for index in range(4):
        clear_rgb, clear_mask = synth.render("clear", 11, index, SIZE)
        for domain in _street_domains():
            if domain == "clear":
                continue
            rgb, mask = synth.render(domain, 11, index, SIZE)
            np.testing.assert_array_equal(mask, clear_mask, err_msg=domain)
            assert not np.array_equal(rgb, clear_rgb), domain


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
    with pytest.raises(KeyError):
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

    monkeypatch.setattr(synth, "render", flaky)
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
