"""Exact LoRA fusion (DESIGN §5): the weighted sum of deltas, never A/B averaging.

Each LoRA-targeted ``nn.Linear`` of the base is wrapped in :class:`FusedLinear`. Two exact paths:

* mixture (per image): ``y = W x + B_cat · diag(m_b) · A_cat x`` with ``m_b = w_b ⊗ s`` (each
  adapter's weight for image b, repeated over its rank, times its scale alpha/r). Each image
  of a batch has its own weights; one pair of GEMMs per layer; no merged weight is built.
* merged (one weight vector for a whole batch): ``W' = W + B_cat diag(w ⊗ s) A_cat`` written
  into the layer; :meth:`FusionEngine.unmerge` restores the original weight bit-exactly.

Concatenating A and B over adapters makes adapters of different ranks fuse exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Iterable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from semla.schemas import Manifest
from semla.schemas.errors import IncompatibleAdapterError

__all__ = ["FusedLinear", "LoraAdapter", "FusionEngine", "load_adapter", "FUSION_MODES", "list_fusion_modes"]

FUSION_MODES = ("mixture", "merged")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def list_fusion_modes() -> list[str]:
    return list(FUSION_MODES)


class FusedLinear(nn.Module):
    """An ``nn.Linear`` plus an optional per-image low-rank mixture."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A: torch.Tensor | None = None  # (R, in)
        self.lora_B: torch.Tensor | None = None  # (out, R)
        self.mix: torch.Tensor | None = None  # (B, R): per-image weight x scale, per rank row

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, in)
        y = self.base(x)
        if self.mix is None:
            return y
        h = (x @ self.lora_A.T) * self.mix[:, None, :]  # (B, N, R)
        return y + h @ self.lora_B.T  # (B, N, out)


@dataclasses.dataclass
class LoraAdapter:
    """One verified adapter's tensors, keyed by module name, on a device."""

    key: str
    scale: float
    A: dict[str, torch.Tensor]  # module → (r, in)
    B: dict[str, torch.Tensor]  # module → (out, r)

    def delta(self, module: str) -> torch.Tensor:
        """Dense ``s · B A`` for one module (the reference the fast paths are tested against)."""
        return self.scale * self.B[module] @ self.A[module]


def load_adapter(
    key: str, weights: bytes, manifest: Manifest, model_fingerprint: str, targets: dict[str, nn.Linear],
    device: torch.device | str = "cpu",
) -> LoraAdapter:
    """Turn verified safetensors bytes into a :class:`LoraAdapter` fitted to the base model.

    Raises:
        IncompatibleAdapterError: other base fingerprint, a module the base lacks, wrong shapes.
    """
    if manifest.base_model.fingerprint != model_fingerprint:
        raise IncompatibleAdapterError(
            f"adapter {key} was trained on base {manifest.base_model.fingerprint[:12]}, "
            f"this node runs {model_fingerprint[:12]}"
        )
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for name, tensor in load_safetensors(weights).items():
        match = _KEY.match(name)
        if match is None or match["module"] not in targets:
            raise IncompatibleAdapterError(f"adapter {key}: tensor {name!r} targets no LoRA-ready module of the base")
        (A if match["ab"] == "A" else B)[match["module"]] = tensor.to(device=device, dtype=torch.float32)
    for module, a in A.items():
        lin = targets[module]
        b = B.get(module)
        if b is None or a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise IncompatibleAdapterError(f"adapter {key}: module {module} has shapes that do not fit the base")
    return LoraAdapter(key=key, scale=manifest.alpha / manifest.rank, A=A, B=B)


class FusionEngine:
    """Installs :class:`FusedLinear` wrappers into a model and drives both fusion paths."""

    def __init__(self, root: nn.Module, target_modules: Iterable[str]) -> None:
        self.layers: dict[str, FusedLinear] = {}
        for name in target_modules:
            parent_name, _, leaf = name.rpartition(".")
            parent = root.get_submodule(parent_name)
            child = getattr(parent, leaf)
            if isinstance(child, FusedLinear):
                self.layers[name] = child
                continue
            if not isinstance(child, nn.Linear):
                raise IncompatibleAdapterError(f"module {name} is a {type(child).__name__}, not nn.Linear")
            wrapped = FusedLinear(child)
            setattr(parent, leaf, wrapped)
            self.layers[name] = wrapped
        self._originals: dict[str, torch.Tensor] = {}
        self._merged_key: Hashable | None = None
        self._cat_of: tuple[LoraAdapter, ...] = ()
        self._cats: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    @property
    def targets(self) -> dict[str, nn.Linear]:
        return {name: layer.base for name, layer in self.layers.items()}

    def _cat(self, adapters: Sequence[LoraAdapter], name: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        present = [i for i, a in enumerate(adapters) if name in a.A]
        dtype = self.layers[name].base.weight.dtype  # fp16/bf16 bases fuse in their own precision
        A = torch.cat([adapters[i].A[name] for i in present]).to(dtype)  # (R, in)
        B = torch.cat([adapters[i].B[name] for i in present], dim=1).to(dtype)  # (out, R)
        return present, A, B

    @staticmethod
    def _rank_scales(adapters: Sequence[LoraAdapter], present: list[int], weights: torch.Tensor, name: str) -> torch.Tensor:
        """weights (..., n_adapters) → (..., R): each adapter's weight x scale over its rank rows."""
        cols = [
            weights[..., i : i + 1].repeat_interleave(adapters[i].A[name].shape[0], dim=-1) * adapters[i].scale
            for i in present
        ]
        return torch.cat(cols, dim=-1)

    def set_mixture(self, adapters: Sequence[LoraAdapter], weights: torch.Tensor) -> None:
        """Per-image fusion: ``weights`` (B, n_adapters), row b the fusion weights of image b.

        The concatenated A/B of the last adapter set are kept, so consecutive batches over the
        same adapters only recompute the (B, R) scales.
        """
        if weights.ndim != 2 or weights.shape[1] != len(adapters):
            raise ValueError(f"weights must be (batch, {len(adapters)}), got {tuple(weights.shape)}")
        same = len(adapters) == len(self._cat_of) and all(a is b for a, b in zip(adapters, self._cat_of))
        if not same:  # holding the adapters themselves (not ids) keeps this check sound
            self._cat_of = tuple(adapters)
            self._cats = {n: self._cat(adapters, n) for n in self.layers if any(n in a.A for a in adapters)}
        for name, layer in self.layers.items():
            if name not in self._cats:
                layer.mix = None
                continue
            present, A, B = self._cats[name]
            layer.lora_A, layer.lora_B = A, B
            layer.mix = self._rank_scales(adapters, present, weights.to(A.dtype), name)

    def clear(self) -> None:
        """Back to the plain base model (mixture off; merged weights are left to :meth:`unmerge`)."""
        for layer in self.layers.values():
            layer.mix = layer.lora_A = layer.lora_B = None

    @torch.no_grad()
    def merge(self, adapters: Sequence[LoraAdapter], weights: torch.Tensor, key: Hashable | None = None) -> None:
        """Write ``W + B_cat diag(w ⊗ s) A_cat`` into every layer (one weight vector (n,)).

        With a ``key``, a repeated call for the same key keeps the merged weights as they are
        (a stream of one domain merges once).
        """
        if key is not None and key == self._merged_key:
            return
        self.unmerge()
        self.clear()
        self._merged_key = key
        for name, layer in self.layers.items():
            if not any(name in a.A for a in adapters):
                continue
            present, A, B = self._cat(adapters, name)
            scales = self._rank_scales(adapters, present, weights.to(A.dtype), name)  # (R,)
            weight = layer.base.weight
            self._originals[name] = weight.detach().clone()
            weight.add_(((B * scales) @ A).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every merged layer's original weight, bit-exactly."""
        for name, original in self._originals.items():
            self.layers[name].base.weight.copy_(original)
        self._originals.clear()
        self._merged_key = None
