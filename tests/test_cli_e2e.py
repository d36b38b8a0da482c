"""The whole product loop through the real command lines, on loopback:
keygen, register, synth, train, publish (dry run, real, refused), segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from semla.server.local import local_registry

BIN = Path(sys.executable).parent
TOKEN = "test-admin-token"
CLASSES = "sky,road,sidewalk,building,vegetation,car,person,pole"


def cli(*args: str, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and fragment in lines[0], lines[0]


@pytest.fixture
def registry(tmp_path):
    with local_registry(tmp_path / "reg", TOKEN) as url:
        yield url


@pytest.mark.slow
@pytest.mark.ci_slow  # a real loop: CI runs it in make test-slow
def test_full_loop_on_loopback(tmp_path, registry):
    key = tmp_path / "owner.key"
    out = cli("semla-client", "keygen", "--out", str(key)).stdout
    assert "key id" in out and (key.stat().st_mode & 0o777) == 0o600 and key.with_suffix(".key.pub").exists()
    cli("semla-client", "register", "--registry", registry, "--key", str(key), "--token", TOKEN)

    assert "fog" in cli("semla-client", "synth", "--list").stdout
    data = tmp_path / "fog-data"
    cli("semla-client", "synth", "--domain", "fog", "--n", "50", "--seed", "1", "--out", str(data))
    bundle = tmp_path / "fog-bundle"
    cli("semla-client", "train", "--data", str(data), "--out", str(bundle), "--name", "fog", "--steps", "10")
    assert sorted(p.name for p in bundle.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]

    dry = cli("semla-client", "publish", str(bundle), "--registry", registry, "--key", str(key), "--dry-run").stdout
    assert "nothing was sent" in dry and "adapter_model.safetensors" in dry and "centroids.vectors" in dry
    assert httpx.get(registry + "/v1/adapters").json() == []

    cli("semla-client", "publish", str(bundle), "--registry", registry, "--key", str(key))
    listing = httpx.get(registry + "/v1/adapters").json()
    assert [(a["name"], a["version"]) for a in listing] == [("fog", 1)]

    refused = cli("semla-client", "publish", str(bundle), "--registry", registry, check=False)
    assert_one_line_error(refused, "stale_version")

    images = []
    for i in range(2):
        path = tmp_path / f"query{i}.png"
        img, _ = __import__("semla.registry.synth", fromlist=["render"]).render("fog", 5000, i)
        Image.fromarray(img).save(path)
        images.append(str(path))
    masks = tmp_path / "masks"
    seg = cli("semla-node", "segment", *images, "--registry", registry, "--classes", CLASSES, "--json",
              "--out", str(masks), "--cache-dir", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in seg.stdout.splitlines()]
    assert [r["image"] for r in rows] == images
    for row in rows:
        assert row["classes"] == CLASSES.split(",")
        assert [c["name"] for c in row["contributions"]] == ["fog"]  # top-k capped at the library size
        assert sum(c["weight"] for c in row["contributions"]) == pytest.approx(1.0)
        assert set(row["contributions"][0]) == {"name", "version", "publisher", "distance", "weight"}
    mask = np.asarray(Image.open(masks / "query0.png"))
    assert mask.shape == (96, 96) and mask.max() < 8
    assert (masks / "query1.overlay.png").exists()
    assert any((tmp_path / "cache").rglob("manifest.sig"))  # verified and cached

    new_key = tmp_path / "new.key"
    cli("semla-client", "keygen", "--out", str(new_key))
    assert "rotated" in cli("semla-client", "rotate-key", "--registry", registry, "--key", str(key),
                            "--new-key", str(new_key)).stdout
    # the rotated-away key can do nothing; its successor manages what the old key published
    refused = cli("semla-client", "revoke", "fog", "1", "--registry", registry, "--key", str(key), check=False)
    assert refused.returncode == 1 and "key_rotated" in refused.stderr
    assert "revoked fog v1" in cli("semla-client", "revoke", "fog", "1", "--registry", registry,
                                   "--key", str(new_key)).stdout
    assert httpx.get(registry + "/v1/adapters").json() == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["semla-client", "train", "--data", "{tmp}/nothing", "--out", "{tmp}/b", "--name", "x"], "does not exist"),
        (["semla-client", "train", "--data", "{small}", "--out", "{tmp}/b", "--name", "x"], "at least 50"),
        (["semla-client", "train", "--data", "{small}", "--out", "{tmp}/b", "--name", "x", "--min-samples", "5",
          "--rank", "0"], "rank"),
        (["semla-client", "synth", "--domain", "mars", "--out", "{tmp}/m"], "unknown domain"),
        (["semla-client", "sign", "{tmp}", "--key", "{tmp}/missing.key"], "cannot read key"),
        (["semla-node", "segment", "{tmp}/none.png", "--registry", "http://127.0.0.1:9", "--classes", "a"],
         "does not exist"),
        (["semla-node", "segment", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", ","],
         "empty"),
        (["semla-node", "segment", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", "a",
          "--device", "tpu"], "device"),
        (["semla-node", "segment", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", "a",
          "--top-k", "0"], "--top-k"),
        (["semla-node", "explain", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", "a",
          "--temperature", "0", "--out", "{tmp}/x"], "--temperature"),
        (["semla-client", "publish", "{tmp}/b", "--registry", "http://127.0.0.1:9"], "not a bundle directory"),
        (["semla-node", "segment", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", "a",
          "--weighting", "softmax"], "valid: calibrated, neg-distance, paper"),
        (["semla-node", "explain", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--classes", "a",
          "--guard-z", "2", "--out", "{tmp}/x"], "--guard-z needs --guard"),
        (["semla-node", "fuse", "{small}/images/00000.png", "--registry", "http://127.0.0.1:9", "--out", "{tmp}/f",
          "--guard", "--guard-z", "-1"], "--guard-z"),
        (["semla-node", "serve", "--registry", "http://127.0.0.1:9", "--weighting", "nearest"], "weighting"),
    ],
)
def test_bad_input_gets_one_line_and_nothing_half_written(tmp_path, args, fragment):
    from semla.registry import synth

    small = synth.write_dataset("clear", 6, 0, tmp_path / "small", size=32)
    args = [a.format(tmp=tmp_path, small=small) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(cli(*args, check=False), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
