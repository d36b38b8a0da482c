"""The paper-shaped benchmark: its generator, its summary arithmetic, and ``--quick`` end to end
(base trained on the source set, adapters through the real path, nested leave-one-out, every method)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from semla.registry.synth import paper as synth_paper
from semla.registry.model import TINY_WEIGHTS
from semla.schemas.errors import InvalidInputError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def paper():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("semla_paper", BENCH / "semla_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(BENCH))


# -- the generator ---------------------------------------------------------------------------------------


def test_composition_is_the_papers() -> None:
    domains = synth_paper.paper_domains()
    assert len(domains) == 20
    kinds = [synth_paper.DATASETS[synth_paper.get_domain(d).dataset].kind for d in domains]
    assert kinds.count("driving") == 16 and kinds.count("general") == 4
    per_dataset: dict[str, int] = {}
    for d in domains:
        per_dataset[synth_paper.get_domain(d).dataset] = per_dataset.get(synth_paper.get_domain(d).dataset, 0) + 1
    assert len(per_dataset) == 10
    assert sorted(per_dataset.values()) == [1] * 8 + [4, 8]
    # conditions act across datasets: fog is one shift in the MUSES-like and the ACDC-like dataset
    assert synth_paper.get_domain("allweather_fog").condition == synth_paper.get_domain("adverse_fog").condition
    assert "source" not in domains and synth_paper.SOURCE.name not in synth_paper.DATASETS


def test_labelling_differs_between_source_and_driving() -> None:
    source = synth_paper.classes("source")
    driving = synth_paper.classes("metro")
    assert {"sidewalk", "vegetation", "terrain"} <= set(driving)
    assert not {"sidewalk", "vegetation", "terrain"} & set(source)  # the base never sees those names
    assert "vehicle" in synth_paper.classes("delhi") and "pole" not in synth_paper.classes("delhi")


def test_render_is_deterministic_and_labelled() -> None:
    for d in ("allweather_night", "metro", "context", "rooms"):
        seed = synth_paper.split_seeds(d)[1]
        rgb, mask = synth_paper.render(d, seed, 3, 48)
        again, mask2 = synth_paper.render(d, seed, 3, 48)
        assert rgb.shape == (48, 48, 3) and mask.shape == (48, 48)
        assert np.array_equal(rgb, again) and np.array_equal(mask, mask2)
        labelled = mask[mask != 255]
        assert labelled.size and labelled.max() < len(synth_paper.classes(d))
    # the ego hood is unlabelled in a dataset whose camera shows it
    hoods = [synth_paper.render("fleet", 5, i, 48)[1][-2:] for i in range(3)]
    assert all((h == 255).mean() > 0.5 for h in hoods)
    train, test = synth_paper.split_seeds("metro")
    assert train != test and synth_paper.split_seeds("fleet")[0] not in (train, test)
    with pytest.raises(InvalidInputError, match="unknown domain 'atlantis'; valid:"):
        synth_paper.render("atlantis", 0, 0)


def test_source_set_covers_every_scene_with_generic_names() -> None:
    images, masks, classes = synth_paper.render_source(2, seed=3, size=32)
    assert len(images) == len(masks) == 8
    assert classes == synth_paper.classes("source")
    assert all(m[m != 255].max() < len(classes) for m in masks)


# -- the summary arithmetic ----------------------------------------------------------------------------


def test_headline_against_hand_computed_values(paper) -> None:
    table = {
        "a": {"base": 0.2, "oracle": 0.6, "uniform": 0.3, "nearest": 0.5, "semla": 0.5},
        "b": {"base": 0.4, "oracle": 0.5, "uniform": 0.45, "nearest": 0.42, "semla": 0.38},
    }
    h = paper.sb.headline(table, "semla")
    hm = lambda x, y: 2 / (1 / x + 1 / y)  # noqa: E731
    assert h["gap_closed_hmean"] == pytest.approx((hm(0.5, 0.38) - hm(0.2, 0.4)) / (hm(0.6, 0.5) - hm(0.2, 0.4)), abs=1e-3)
    assert h["gap_closed_mean"] == pytest.approx((0.44 - 0.3) / (0.55 - 0.3), abs=1e-4)
    assert h["wins_vs_uniform"] == 1 and h["wins_vs_nearest"] == 0
    assert h["worst_drop_vs_base"] == pytest.approx(0.02)


def test_bad_arguments(paper, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        paper.main(["--quick", "--domains", "metro,atlantis", "--workdir", str(tmp_path)])
    assert exc.value.code == 2 and "unknown domain 'atlantis'; valid:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.main(["--quick", "--base", "ViT-B-16", "--workdir", str(tmp_path)])
    assert "needs --pretrained PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.main(["--quick", "--data", f"x={tmp_path}:{tmp_path}", "--workdir", str(tmp_path)])
    assert "has no classes.txt" in capsys.readouterr().err
    assert not (tmp_path / "bundles").exists()


# -- end to end ------------------------------------------------------------------------------------------


def _check(result: dict, paper, domains: list[str]) -> None:
    assert list(result["per_domain"]) == domains
    for d, row in result["per_domain"].items():
        assert tuple(row) == paper.METHODS
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert row["oracle"] >= row["base"], (d, row)  # its own adapter helps on its own domain
    rep = result["report"]
    for m in paper.METHODS:
        col = [result["per_domain"][d][m] for d in domains]
        assert rep["mean"][m] == pytest.approx(np.mean(col), abs=1e-4)
        assert rep["hmean"][m] == pytest.approx(len(col) / sum(1 / v for v in col), abs=1e-4)
    for m, gaps in rep["gap_closed"].items():  # every gap fraction follows from the table
        for d, g in gaps["per_domain"].items():
            r = result["per_domain"][d]
            if r["oracle"] - r["base"] > 1e-9:
                assert g == pytest.approx((r[m] - r["base"]) / (r["oracle"] - r["base"]), abs=1e-3)
        mean = {k: np.mean([result["per_domain"][d][k] for d in domains]) for k in ("base", "oracle", m)}
        assert gaps["of_mean"] == pytest.approx((mean[m] - mean["base"]) / (mean["oracle"] - mean["base"]), abs=1e-3)
    s = result["summary"]
    assert s["method"] == "semla"
    assert s["gap_closed_hmean"] == pytest.approx(rep["gap_closed"]["semla"]["of_hmean"], abs=2e-3)
    assert s["gap_closed_mean"] == pytest.approx(rep["gap_closed"]["semla"]["of_mean"], abs=1e-3)
    assert s["wins_vs_uniform"] == rep["wins"]["semla"]["uniform"]
    assert s["wins_vs_nearest"] == rep["wins"]["semla"]["nearest"]
    drops = [r["base"] - r["semla"] for r in result["per_domain"].values()]
    assert s["worst_drop_vs_base"] == pytest.approx(max([0.0] + drops))
    sel = result["selection"]
    assert "No image of the target" in sel["procedure"]
    for d in domains:
        chosen = sel["chosen"][d]
        assert chosen["temperature"] in sel["grid"]["temperature"] and chosen["top_k"] in sel["grid"]["top_k"]
        assert chosen["guard_z"] in sel["grid"]["guard_z"]
        assert chosen["inner_domains"] == len(domains) - 1
    c = result["ceiling"]
    for d in domains:  # each library adapter alone; the best one per domain, picked with the labels
        singles = c["single_adapter_miou"][d]
        assert sorted(singles) == sorted(x for x in domains if x != d)
        assert c["best_single"][d]["miou"] == max(singles.values())
        assert singles[c["best_single"][d]["adapter"]] == c["best_single"][d]["miou"]


def test_ceiling_by_hand(paper) -> None:
    per_domain = {"a": {"base": 0.2, "oracle": 0.6}, "b": {"base": 0.4, "oracle": 0.5}}
    singles = {"a": {"b": 0.4}, "b": {"a": 0.3}}
    c = paper.ceiling(per_domain, singles)
    assert c["best_single"] == {"a": {"adapter": "b", "miou": 0.4}, "b": {"adapter": "a", "miou": 0.3}}
    assert c["gap_closed_mean"] == pytest.approx(((0.4 + 0.3) / 2 - 0.3) / (0.55 - 0.3), abs=1e-4)
    hm = lambda xs: len(xs) / sum(1 / x for x in xs)  # noqa: E731
    assert c["gap_closed_hmean"] == pytest.approx((hm([0.4, 0.3]) - hm([0.2, 0.4])) / (hm([0.6, 0.5]) - hm([0.2, 0.4])),
                                                  abs=1e-4)
    assert c["domains_where_every_library_adapter_is_below_base"] == ["b"]


def test_quick(paper, tmp_path: Path) -> None:
    argv = ["--quick", "--quiet", "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    assert paper.main(argv) == 0
    result = json.loads((tmp_path / "out" / "semla_paper-quick.json").read_text())
    domains = list(paper.QUICK_DOMAINS)
    _check(result, paper, domains)
    assert result["trained_this_run"] == domains
    assert result["datasets"]["metro"]["like"] == "Cityscapes"
    assert result["seconds"]["base_training"] > 0
    assert list((tmp_path / "work" / "base").glob("*.safetensors"))
    assert (tmp_path / "out" / result["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_resumes_and_reads_real_folders(paper, tmp_path: Path) -> None:
    """A second run trains nothing; real dataset folders and a given base (no base stage) work."""
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--quiet", "--no-plots", "--workdir", str(work), "--out-dir", str(out)]
    assert paper.main(argv) == 0
    first = json.loads((out / "semla_paper-quick.json").read_text())
    assert paper.main(argv) == 0
    again = json.loads((out / "semla_paper-quick.json").read_text())
    assert again["trained_this_run"] == [] and again["seconds"]["base_training"] == 0
    assert again["per_domain"] == first["per_domain"]

    data = []
    for d in ("adverse_night", "fleet"):
        train, test = synth_paper.split_seeds(d)
        synth_paper.write_dataset(d, 10, train, tmp_path / "real" / d / "train")
        synth_paper.write_dataset(d, 4, test, tmp_path / "real" / d / "test")
        data += ["--data", f"{d}={tmp_path / 'real' / d / 'train'}:{tmp_path / 'real' / d / 'test'}"]
    assert paper.main(argv + ["--pretrained", str(TINY_WEIGHTS), *data, "--json-name", "real.json"]) == 0
    real = json.loads((out / "real.json").read_text())
    assert real["benchmark"] == "real folders" and list(real["per_domain"]) == ["adverse_night", "fleet"]
    assert real["seconds"]["base_training"] == 0 and real["config"]["base_weights"] == TINY_WEIGHTS.name
    assert real["config"]["classes"]["fleet"] == synth_paper.classes("fleet")
