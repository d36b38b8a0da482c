"""Compute a base model's card (needs torch, imported on use).

The card (:class:`~semla.schemas.basecard.BaseCard`) is what the torch-free registry checks
adapters against; it is computed here from a loaded model: each LoRA target's sizes and
``||W||_F``, and the retrieval embedding's name and dimension (one embedding of a blank image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from semla.schemas.basecard import BaseCard, CardBounds, EmbeddingSpec, TargetLayer

if TYPE_CHECKING:
    from semla.registry.model import DenseClip

__all__ = ["compute_base_card"]


def compute_base_card(base: "DenseClip", bounds: CardBounds = CardBounds()) -> BaseCard:
    """The card of a loaded base model (call before any adapter is merged into it)."""
    import torch

    from semla.registry.model import lora_target_modules

    targets = {}
    for name in lora_target_modules(base.clip):
        layer = base.clip.get_submodule(name)
        layer = getattr(layer, "base", layer)  # a FusedLinear wraps the nn.Linear
        targets[name] = TargetLayer(in_features=layer.in_features, out_features=layer.out_features,
                                    weight_norm=float(torch.linalg.norm(layer.weight.detach().double())))
    with torch.no_grad():
        blank = torch.zeros(1, 3, base.image_size, base.image_size, device=base.device)
        dim = int(base.embed(blank).shape[-1])
    return BaseCard(arch=base.ref.arch, fingerprint=base.ref.fingerprint,
                    embedding=EmbeddingSpec(name=base.embedding_model, dim=dim), targets=targets, bounds=bounds)
