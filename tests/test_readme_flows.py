"""The README's consumer and owner sections, run as written against a registry on loopback.

Consumer: ``semla-node fuse`` then the Python snippet (plain peft) — its mask must equal the
node's own merged output for the export's weights. Owner: ``import``, ``train``, ``publish``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semla.client import publish_bundle
from semla.registry import keys, synth
from semla.registry.http import RegistryClient
from semla.registry.node import Node
from semla.registry.train import TrainConfig, train_adapter
from semla.server.local import local_registry

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent
TOKEN = "readme-token"
README_URL = "http://127.0.0.1:8080"


def readme_blocks(heading: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the README section whose heading starts with ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell lines of a README block (comments dropped, backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = [str(BIN / argv[0])] if (BIN / argv[0]).exists() else [argv[0]]
    done = subprocess.run(exe + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done


@pytest.mark.slow
def test_consumer_two_commands_fuse_then_plain_peft(tmp_path, tiny_base):
    (fuse_block,) = readme_blocks("## For consumers", "sh")
    (snippet,) = readme_blocks("## For consumers", "python")
    (fuse,) = commands(fuse_block)
    work = tmp_path / "consumer"
    work.mkdir()
    with local_registry(tmp_path / "reg", TOKEN, timeout=180) as url:
        client = RegistryClient(url)
        key = keys.generate_key()
        client.register_key(keys.public_bytes(key).hex(), TOKEN)
        for i, (domain, rank) in enumerate((("fog", 8), ("night", 4))):
            data = synth.write_dataset(domain, 50, 60 + i, tmp_path / f"{domain}-data")
            train_adapter(data, tmp_path / domain, domain, TrainConfig(steps=6, lr=1e-2, rank=rank),
                          base=tiny_base, progress=False)
            publish_bundle(tmp_path / domain, client, key=key)
        for i, name in enumerate(a for a in fuse if a.endswith(".png")):
            Image.fromarray(synth.render("fog" if i == 0 else "night", 9090, i)[0]).save(work / name)

        fuse = [url if a == README_URL else a for a in fuse] + ["--cache-dir", str(tmp_path / "cli-cache")]
        run(fuse, work)
        run([sys.executable, "-c", snippet + "\nimport numpy\nnumpy.save('mask.npy', mask.numpy())\n"], work)

        manifest = json.loads((work / "fused" / "manifest.json").read_text())
        assert manifest["derived"] is True and manifest["weights"]["images"] == 2
        weights = {a["name"]: a["weight"] for a in manifest["adapters"]}
        assert set(weights) == {"fog", "night"} and sum(weights.values()) == pytest.approx(1.0)
        node = Node(url, base=copy.deepcopy(tiny_base), cache_dir=tmp_path / "cache")
        node.pull()
        names = [a.name for a in node.library]
        idx = [names.index(n) for n in weights]
        node.engine.merge([node.adapter(node.library[i]) for i in idx], torch.tensor(list(weights.values())))
        classes = re.search(r"classes = (\[.*?\])", snippet)[1]
        image = np.array(Image.open(work / "street1.png").convert("RGB"))
        with torch.no_grad():
            want = node.base(node.base.pixels([image]), node.text(json.loads(classes))).argmax(1)[0].numpy()
    got = np.load(work / "mask.npy")
    assert got.shape == want.shape == (96, 96)
    assert (got == want).mean() >= 0.999


@pytest.mark.slow
def test_owner_three_commands_import_train_publish(tmp_path):
    from test_importers import write_cityscapes

    (block,) = readme_blocks("## For data owners", "sh")
    lines = commands(block)
    assert [line[:2] for line in lines] == [["semla-client", "import"], ["semla-client", "train"],
                                           ["semla-client", "publish"]]
    root = tmp_path / "cityscapes"
    write_cityscapes(root, 50, size=(48, 96))
    with local_registry(tmp_path / "reg", TOKEN, timeout=180) as url:
        run(["semla-client", "keygen", "--out", "owner.key"], tmp_path)
        run(["semla-client", "register", "--registry", url, "--key", "owner.key", "--token", TOKEN], tmp_path)
        for line in lines:
            line = [str(root) if a.startswith("~/") else url if a == README_URL else a for a in line]
            if line[1] == "train":
                line += ["--steps", "3"]  # the README trains 300 steps; the flow is what is tested
            run(line, tmp_path)
        listing = RegistryClient(url).list_adapters()
    assert [(a.name, a.version, a.sample_count) for a in listing] == [("cityscapes", 1, 50)]
