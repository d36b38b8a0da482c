"""Exact fusion: mixture and merged paths against the dense reference; peft compatibility."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from semla.registry.bundle import read_bundle
from semla.registry.fusion import FusionEngine, LoraAdapter, load_adapter
from semla.registry.model import lora_target_modules
from semla.schemas import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, Manifest
from semla.schemas.errors import IncompatibleAdapterError


def random_adapter(base, key: str, rank: int, alpha: float, seed: int, modules=None) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name in modules or lora_target_modules(base.clip):
        lin = base.clip.get_submodule(name)
        A[name] = torch.randn(rank, lin.in_features, generator=gen) * 0.1
        B[name] = torch.randn(lin.out_features, rank, generator=gen) * 0.1
    return LoraAdapter(key=key, scale=alpha / rank, A=A, B=B)


def dense_reference(base, adapters, weights_row, pixels, text):
    """Σ wᵢ sᵢ Bᵢ Aᵢ added to a copy of the weights, explicitly, one image at a time."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name in lora_target_modules(model.clip):
            lin = model.clip.get_submodule(name)
            for a, w in zip(adapters, weights_row):
                if name in a.A:
                    lin.weight.add_(float(w) * a.delta(name))
        return model.dense_logits(pixels, text)


@pytest.fixture
def adapters(tiny_base):
    targets = lora_target_modules(tiny_base.clip)
    return [
        random_adapter(tiny_base, "a", rank=8, alpha=16, seed=1),
        random_adapter(tiny_base, "b", rank=16, alpha=8, seed=2),  # another rank fuses exactly
        random_adapter(tiny_base, "c", rank=4, alpha=4, seed=3, modules=targets[::2]),  # fewer targets
    ]


@pytest.mark.parametrize("layout", ["concat", "gather", "auto"])
def test_mixture_equals_dense_reference_per_image(tiny_base, adapters, layout):
    base = copy.deepcopy(tiny_base)
    engine = FusionEngine(base.clip, lora_target_modules(base.clip))
    pixels = torch.randn(3, 3, 96, 96)
    text = base.encode_classes(["sky", "road", "car", "person"])
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    engine.set_mixture(adapters, weights, layout=layout)
    with torch.no_grad():
        fused = base.dense_logits(pixels, text)
    for b in range(3):
        expected = dense_reference(tiny_base, adapters, weights[b], pixels[b : b + 1], text)
        assert (fused[b : b + 1] - expected).abs().max() <= 1e-5
    engine.clear()
    with torch.no_grad():
        assert torch.allclose(base.dense_logits(pixels, text), tiny_base.dense_logits(pixels, text), atol=1e-6)
    # the fusion really changes the prediction (the test would catch a no-op)
    assert (fused - tiny_base.dense_logits(pixels, text)).abs().max() > 1e-2


def test_merged_equals_mixture_and_unmerge_is_bit_exact(tiny_base, adapters):
    base = copy.deepcopy(tiny_base)
    engine = FusionEngine(base.clip, lora_target_modules(base.clip))
    originals = {n: layer.base.weight.clone() for n, layer in engine.layers.items()}
    pixels = torch.randn(2, 3, 96, 96)
    text = base.encode_classes(["sky", "road"])
    w = torch.tensor([0.5, 0.3, 0.2])
    engine.merge(adapters, w)
    with torch.no_grad():
        merged = base.dense_logits(pixels, text)
    expected = dense_reference(tiny_base, adapters, w, pixels, text)
    assert (merged - expected).abs().max() <= 1e-5
    engine.unmerge()
    for name, layer in engine.layers.items():
        assert torch.equal(layer.base.weight, originals[name])


def test_averaging_a_and_b_is_not_exact(tiny_base, adapters):
    """Why fusion concatenates: averaging A and B of independent adapters is far off."""
    a, b = adapters[0], random_adapter(tiny_base, "b8", rank=8, alpha=16, seed=9)
    name = lora_target_modules(tiny_base.clip)[0]
    exact = 0.5 * a.delta(name) + 0.5 * b.delta(name)
    averaged = a.scale * (0.5 * a.B[name] + 0.5 * b.B[name]) @ (0.5 * a.A[name] + 0.5 * b.A[name])
    assert (exact - averaged).norm() / exact.norm() > 0.5


def test_peft_loads_a_bundle_with_the_same_outputs(tiny_base, trained_bundle):
    files = read_bundle(trained_bundle)
    manifest = Manifest.parse(files[MANIFEST_FILE])
    pixels = torch.randn(2, 3, 96, 96)
    text = tiny_base.encode_classes(manifest.vocabulary)

    ours = copy.deepcopy(tiny_base)
    engine = FusionEngine(ours.clip, lora_target_modules(ours.clip))
    adapter = load_adapter("fog@1", files[ADAPTER_WEIGHTS_FILE], manifest, ours.ref.fingerprint, engine.targets)
    engine.set_mixture([adapter], torch.ones(2, 1))
    with torch.no_grad():
        fused = ours.dense_logits(pixels, text)

    theirs = copy.deepcopy(tiny_base)
    peft.PeftModel.from_pretrained(theirs.clip, str(trained_bundle))  # injects LoRA in place
    with torch.no_grad():
        via_peft = theirs.dense_logits(pixels, text)
    assert (fused - via_peft).abs().max() <= 1e-5
    assert (fused - tiny_base.dense_logits(pixels, text)).abs().max() > 1e-4  # training moved it


def test_adapter_for_another_base_is_refused(tiny_base, trained_bundle):
    files = read_bundle(trained_bundle)
    manifest = Manifest.parse(files[MANIFEST_FILE])
    engine_targets = {n: tiny_base.clip.get_submodule(n) for n in lora_target_modules(tiny_base.clip)}
    with pytest.raises(IncompatibleAdapterError, match="trained on base"):
        load_adapter("fog@1", files[ADAPTER_WEIGHTS_FILE], manifest, "0" * 64, engine_targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_mixture_and_merged_on_cuda(tiny_base, adapters, dtype, tol):
    """On a GPU: both paths against the fp32 CPU dense reference; fp16/bf16 within a stated tolerance
    on the unit-norm dense embeddings."""
    base = copy.deepcopy(tiny_base).to("cuda", dtype)
    engine = FusionEngine(base.clip, lora_target_modules(base.clip))
    on_gpu = [LoraAdapter(a.key, a.scale, {k: v.cuda() for k, v in a.A.items()}, {k: v.cuda() for k, v in a.B.items()})
              for a in adapters]
    pixels = torch.randn(3, 3, 96, 96)
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    engine.set_mixture(on_gpu, weights.cuda(), layout="gather")
    with torch.no_grad():
        fused = base.encode_dense(pixels.cuda().to(dtype)).float().cpu()
    engine.clear()
    for b in range(3):
        ref = copy.deepcopy(tiny_base)
        with torch.no_grad():
            for name in lora_target_modules(ref.clip):
                lin = ref.clip.get_submodule(name)
                for a, w in zip(adapters, weights[b]):
                    if name in a.A:
                        lin.weight.add_(float(w) * a.delta(name))
            expected = ref.encode_dense(pixels[b : b + 1])
        assert (fused[b : b + 1] - expected).abs().max() <= tol
    engine.merge(on_gpu, weights[2].cuda())
    with torch.no_grad():
        merged = base.encode_dense(pixels[2:].cuda().to(dtype)).float().cpu()
    assert (merged - fused[2:]).abs().max() <= tol
