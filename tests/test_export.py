"""Verified pull and fused export: what a consumer with plain peft gets out of the registry.

The registry holds fog (rank 8) and night (rank 4); plain peft loading a pulled bundle or a
fused export on a fresh semla-tiny must reproduce the node's own (merged) output.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from fastapi.testclient import TestClient

from semla.client import publish_bundle
from semla.registry import keys, synth
from semla.registry.export import fuse_adapters, fused_lora, parse_weights, retrieval_weights
from semla.registry.fusion import LoraAdapter
from semla.registry.http import RegistryClient
from semla.registry.node import Node, Retrieval
from semla.registry.pull import pull_adapter
from semla.registry.train import TrainConfig, train_adapter
from semla.schemas import ADAPTER_WEIGHTS_FILE, BUNDLE_FILES
from semla.schemas.errors import InvalidInputError, NotFoundError, VerificationError
from semla.server import ServerSettings, create_app

TOKEN = "export-test-token"
RANKS = {"fog": 8, "night": 4}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base):
    """An in-process registry holding fog (rank 8) and night (rank 4)."""
    root = tmp_path_factory.mktemp("export")
    app = create_app(ServerSettings(data_dir=root / "registry", admin_token=TOKEN))
    client = RegistryClient("http://registry.test", client=TestClient(app, base_url="http://registry.test"))
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    for i, (domain, rank) in enumerate(RANKS.items()):
        data = synth.write_dataset(domain, 50, 40 + i, root / f"{domain}-data")
        train_adapter(data, root / domain, domain, TrainConfig(steps=6, lr=1e-2, rank=rank, alpha=2.0 * rank + i),
                      base=tiny_base, progress=False)
        publish_bundle(root / domain, client, key=key)
    return client


@pytest.fixture
def node(registry, fresh_base, tmp_path) -> Node:
    node = Node(registry, base=fresh_base, cache_dir=tmp_path / "cache")
    node.pull()
    return node


@pytest.fixture
def pixels(tiny_base):
    images = [synth.render(d, 4242, i)[0] for d in ("fog", "night") for i in range(2)]
    return tiny_base.pixels(images)


def node_merged(node: Node, pixels: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """The node's own output with one weight vector for the batch (its merged path)."""
    names = [a.name for a in node.library]
    idx = torch.tensor([[names.index(n) for n in weights]] * len(pixels))
    w = torch.tensor([list(weights.values())] * len(pixels))
    return node.fused_dense(pixels, Retrieval(idx, torch.zeros_like(w), w))


def peft_dense(tiny_base, folder, pixels) -> torch.Tensor:
    """Plain peft on a fresh base: what a consumer's own stack computes."""
    base = copy.deepcopy(tiny_base)
    model = peft.PeftModel.from_pretrained(base.clip, str(folder))
    with torch.no_grad():
        out = base.encode_dense(pixels)
    assert isinstance(model, peft.PeftModel)
    return out


def test_pulled_bundle_loads_in_plain_peft_and_equals_the_node(node, tiny_base, pixels, tmp_path):
    out = tmp_path / "fog"
    summary = pull_adapter(node, "fog", out)
    assert (summary.name, summary.version) == ("fog", 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES)

    got = peft_dense(tiny_base, out, pixels)
    want = node_merged(node, pixels, {"fog": 1.0})
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - tiny_base.encode_dense(pixels)).abs().max().item() > 1e-3  # the adapter does something


def test_pull_refuses_tampering_unlisted_versions_and_foreign_folders(node, tmp_path):
    fetch = node.client.fetch_file

    def tampered(name, version, filename):
        data = fetch(name, version, filename)
        return data[:-1] + bytes([data[-1] ^ 1]) if filename == ADAPTER_WEIGHTS_FILE else data

    node.client.fetch_file = tampered
    with pytest.raises(VerificationError):
        pull_adapter(node, "fog", tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing half-written beside it
    node.client.fetch_file = fetch

    with pytest.raises(NotFoundError, match="no version 7"):
        pull_adapter(node, "fog@7", tmp_path / "x")
    with pytest.raises(NotFoundError, match="have: fog, night"):
        pull_adapter(node, "rain", tmp_path / "x")
    with pytest.raises(InvalidInputError, match="NAME@VERSION"):
        pull_adapter(node, "fog@latest", tmp_path / "x")

    out = tmp_path / "night"
    pull_adapter(node, "night@1", out)
    with pytest.raises(InvalidInputError, match="--force"):
        pull_adapter(node, "night", out)
    pull_adapter(node, "fog", out, force=True)  # a folder of bundle files is replaced
    assert json.loads((out / "manifest.json").read_text())["name"] == "fog"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="notes.txt"):
        pull_adapter(node, "night", out, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_fused_export_of_given_weights_equals_the_node_merged_output(node, tiny_base, pixels, tmp_path):
    out = tmp_path / "fused"
    export = fuse_adapters(node, {"fog": 0.7, "night@1": 0.3}, out)
    assert export.ranks and set(export.ranks.values()) == {RANKS["fog"] + RANKS["night"]}  # cat of ranks 8 + 4

    got = peft_dense(tiny_base, out, pixels)
    want = node_merged(node, pixels, {"fog": 0.7, "night": 0.3})
    assert (got - want).abs().max().item() <= 1e-5

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12  # peft scale 1: the weights live in lora_B
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["derived"] is True and manifest["weights"] == {"source": "given"}
    listed = {a.name: a for a in node.library}
    assert [(a["name"], a["version"], a["publisher"], a["manifest_sha256"], a["weight"])
            for a in manifest["adapters"]] == [
        (n, 1, listed[n].publisher, listed[n].manifest_sha256, w) for n, w in (("fog", 0.7), ("night", 0.3))]


def test_retrieval_weights_are_the_mean_of_each_images_weights(node, tmp_path):
    images = [synth.render(d, 4343, i)[0] for i, d in enumerate(("fog", "fog", "night"))]
    per_image = node.segment(images, list(synth.STREET_CLASSES), top_k=2)
    want = {n: sum(c.weight for p in per_image for c in p.contributions if c.name == n) / 3 for n in RANKS}

    got = {s.name: w for s, w in retrieval_weights(node, images, top_k=2)}
    assert got == pytest.approx(want, abs=1e-6) and sum(got.values()) == pytest.approx(1.0)
    assert max(got, key=got.get) == "fog"
    top1 = retrieval_weights(node, images[2:], top_k=1)
    assert [(s.name, w) for s, w in top1] == [("night", 1.0)]


def test_fused_lora_is_the_exact_weighted_sum_for_mixed_ranks_and_modules():
    gen = torch.Generator().manual_seed(0)

    def adapter(key, rank, scale, modules):
        return LoraAdapter(key, scale, {m: torch.randn(rank, 6, generator=gen) for m in modules},
                           {m: torch.randn(5, rank, generator=gen) for m in modules})

    adapters = [adapter("a", 2, 4.0, ["m1", "m2"]), adapter("b", 3, 0.5, ["m2"]), adapter("c", 1, 2.0, ["m1"])]
    weights = [0.5, -0.25, 2.0]
    fused = fused_lora(adapters, weights)
    assert {m: tuple(A.shape) for m, (A, _) in fused.items()} == {"m1": (3, 6), "m2": (5, 6)}
    for module, (A, B) in fused.items():
        want = sum(w * a.delta(module) for a, w in zip(adapters, weights) if module in a.A)
        assert torch.allclose(B @ A, want, atol=1e-5)


@pytest.mark.parametrize("text, fragment", [
    ("fog", "NAME=W"), ("fog=x", "not a number"), ("fog=inf", "finite"), ("fog=1,fog@1=2", "twice"),
    ("fog=0", "no non-zero"), ("fog=1e9", "finite"), ("a b=1", "NAME@VERSION"),
])
def test_bad_weights_are_refused_clearly(text, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        parse_weights(text)


@pytest.mark.parametrize("args, fragment", [
    (["fuse", "--out", "{tmp}/f", "--registry", "http://127.0.0.1:9"], "give IMAGE"),
    (["fuse", "{tmp}/a.png", "--weights", "fog=1", "--out", "{tmp}/f", "--registry", "http://127.0.0.1:9"], "not both"),
    (["fuse", "{tmp}/missing.png", "--out", "{tmp}/f", "--registry", "http://127.0.0.1:9"], "does not exist"),
    (["pull", "fog", "--out", "{tmp}/full", "--registry", "http://127.0.0.1:9"], "not empty"),
    (["pull", "fog", "--out", "{tmp}/p", "--registry", "http://127.0.0.1:9", "--cache-dir", "{tmp}/c"], "cannot reach"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args, fragment):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([str(Path(sys.executable).parent / "semla-node"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "c") == before


def test_modules_of_different_total_rank_keep_scale_one_in_plain_peft(tiny_base, tmp_path):
    from safetensors.torch import save_file

    from semla.registry.export import _adapter_config
    from semla.registry.model import lora_target_modules

    base = copy.deepcopy(tiny_base)
    targets = lora_target_modules(base.clip)[:2]
    gen = torch.Generator().manual_seed(1)
    tensors, ranks = {}, {}
    for module, rank in zip(targets, (3, 5)):
        lin = base.clip.get_submodule(module)
        tensors[module] = (torch.randn(rank, lin.in_features, generator=gen),
                           torch.randn(lin.out_features, rank, generator=gen) * 0.01)
        ranks[module] = rank
    state = {f"base_model.model.{m}.lora_{ab}.weight": t for m, (A, B) in tensors.items() for ab, t in (("A", A), ("B", B))}
    tmp_path.joinpath("adapter_config.json").write_text(json.dumps(_adapter_config(base, targets, ranks)))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))

    before = {m: base.clip.get_submodule(m).weight.detach().clone() for m in targets}
    merged = peft.PeftModel.from_pretrained(base.clip, str(tmp_path)).merge_and_unload()
    for m, (A, B) in tensors.items():
        assert torch.allclose(merged.get_submodule(m).weight, before[m] + B @ A, atol=1e-6)
