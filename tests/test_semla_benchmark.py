"""The SemLA benchmark's ``--quick`` mode on two domains: the real path end to end, a table of
the right shape, and an oracle that is at least as good as the base."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from semla.registry import synth

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "semla_benchmark.py"


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("semla_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.slow
@pytest.mark.ci_slow  # a real loop: CI runs it in make test-slow
def test_quick_two_domains(bench_module, tmp_path: Path) -> None:
    # two shifted domains: on clear, the base's own training domain, a 30-step adapter is no better
    domains = [d for d in synth.benchmark_domains() if d in ("fog", "night")]
    argv = ["--quick", "--quiet", "--domains", ",".join(domains), "--workdir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "out")]
    assert bench_module.main(argv) == 0
    result = json.loads((tmp_path / "out" / "semla-quick.json").read_text())

    assert list(result["per_domain"]) == domains
    for domain, row in result["per_domain"].items():
        assert set(row) == set(bench_module.METHODS)
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert row["oracle"] >= row["base"], (domain, row)
        # leave-one-out over two domains leaves one adapter: every library method is that adapter
        assert row["uniform"] == row["nearest"] == row["semla"]
    summary = result["summary"]
    assert summary["domains"] == 2
    assert set(summary["average_miou"]) == set(bench_module.METHODS)
    assert set(result["ablations"]) >= {"top_k", "temperature", "distance", "centroids", "fusion", "library_size"}
    assert set(result["ablations"]["fusion"]) == set(bench_module.FUSIONS)
    assert result["config"]["seeds"][domains[0]]["train"] != result["config"]["seeds"][domains[0]]["test"]
    for name in result["plots"]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["plots"]) == 4

    # resumable: a second run reuses the cached, already trained adapters
    assert result["trained_this_run"] == domains
    assert bench_module.main(argv + ["--no-plots", "--no-ablations"]) == 0
    again = json.loads((tmp_path / "out" / "semla-quick.json").read_text())
    assert again["trained_this_run"] == []
    assert again["per_domain"] == result["per_domain"]


def test_rejects_unknown_domain(bench_module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_module.main(["--quick", "--domains", "fog,atlantis", "--workdir", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown domain 'atlantis'; valid:" in capsys.readouterr().err
    assert not (tmp_path / "bundles").exists()
