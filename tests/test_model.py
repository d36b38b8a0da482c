"""The base model: attention swap equivalence, dense head, fingerprint, backbone loading."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from semla.registry import model as M
from semla.schemas.errors import InvalidInputError


@pytest.mark.parametrize("arch", ["semla-tiny", "ViT-B-16"])
def test_attention_swap_is_equivalent(arch):
    torch.manual_seed(0)
    ref = open_clip.create_model(arch, pretrained=None).eval()
    swapped = M.swap_attention(copy.deepcopy(ref)).eval()
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in swapped.modules())
    size = ref.visual.image_size[0] if isinstance(ref.visual.image_size, tuple) else ref.visual.image_size
    x = torch.randn(2, 3, size, size)
    tokens = open_clip.get_tokenizer(arch)(["a photo of a car.", "road"])
    with torch.no_grad():
        assert (ref.encode_image(x) - swapped.encode_image(x)).abs().max() <= 1e-5
        assert (ref.encode_text(tokens) - swapped.encode_text(tokens)).abs().max() <= 1e-5


def test_lora_on_out_proj_changes_the_output(fresh_base):
    """The reason for the swap: a change to out_proj must reach the output."""
    x = torch.randn(1, 3, 96, 96)
    before = fresh_base.encode_image(x)
    with torch.no_grad():
        out_proj = fresh_base.clip.visual.transformer.resblocks[0].attn.out_proj
        out_proj.weight.add_(0.05 * torch.randn_like(out_proj.weight))
    assert (fresh_base.encode_image(x) - before).abs().max() > 1e-4


def test_global_embedding_matches_open_clip(tiny_base):
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(tiny_base.clip.encode_image(x), dim=-1)
    assert torch.allclose(tiny_base.encode_image(x), expected, atol=1e-6)


def test_dense_head_shapes_and_grid(tiny_base):
    x = torch.randn(2, 3, 96, 96)
    text = tiny_base.encode_classes(["sky", "road", "car"])
    assert text.shape == (3, 64)
    dense = tiny_base.encode_dense(x)
    assert dense.shape[1] >= 12 and dense.shape[1] == dense.shape[2]
    assert tiny_base(x, text).shape == (2, 3, 96, 96)
    with pytest.raises(InvalidInputError):
        tiny_base.encode_classes([])


def test_fingerprint_tracks_every_byte(tiny_base, fresh_base):
    assert tiny_base.ref.fingerprint == M.state_dict_fingerprint(fresh_base.clip)
    with torch.no_grad():
        fresh_base.clip.visual.proj.view(-1)[0] += 1e-3
    assert M.state_dict_fingerprint(fresh_base.clip) != tiny_base.ref.fingerprint


def test_bundled_weights_are_small_and_load():
    assert M.TINY_WEIGHTS.stat().st_size <= 16 * 1024 * 1024
    assert "semla-tiny" in M.list_backbones() and "ViT-B-16" in M.list_backbones()


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(InvalidInputError, match="semla-tiny"):
        M.load_base("no-such-net")


def test_pretrained_download_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidInputError, match="HF_HUB_OFFLINE"):
        M.load_base("ViT-B-16", "openai")


def test_local_checkpoint_path_loads(tmp_path):
    """A local open_clip checkpoint (the production path without a hub) loads bit-exactly."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    base = M.load_base("ViT-B-32", str(path))
    expected = M.state_dict_fingerprint(M.swap_attention(src))
    assert base.ref.fingerprint == expected
    assert base.ref.tag == "file:ckpt.safetensors"


def test_base_training_is_seeded_and_reproducible(tmp_path):
    from semla.registry.train_base import train_base

    runs = [train_base(tmp_path / f"w{i}.safetensors", n_images=4, steps=3, batch_size=4, seed=5, progress=False)
            for i in range(2)]
    other = train_base(tmp_path / "w2.safetensors", n_images=4, steps=3, batch_size=4, seed=6, progress=False)
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"] != other["fingerprint"]
    assert (tmp_path / "w0.safetensors").read_bytes() == (tmp_path / "w1.safetensors").read_bytes()
