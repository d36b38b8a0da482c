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

import collections
import dataclasses
from collections.abc import Hashable, Iterable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from semla.registry.bundle import lora_tensor_name
from semla.schemas import Manifest
from semla.schemas.errors import IncompatibleAdapterError, InvalidInputError

__all__ = ["FusedLinear", "LoraAdapter", "FusionEngine", "load_adapter", "FUSION_PATHS"]

#: How the mixture path lays out the adapters of a batch (see FusionEngine.set_mixture).
MIXTURE_LAYOUTS = ("auto", "concat", "gather")
#: The paths counted in :attr:`FusionEngine.paths`: merged, or a mixture laid out as concat / gather.
FUSION_PATHS = ("merged", "concat", "gather")


class FusedLinear(nn.Module):
    """An ``nn.Linear`` plus an optional per-image low-rank mixture.

    ``At``/``Bt`` are either shared by the batch (``(in, R)`` / ``(R, out)``, the concatenation of
    the batch's adapters) or gathered per image (``(B, in, R)`` / ``(B, R, out)``, each image's
    own top-k only); ``mix`` (B, R) holds each rank row's weight x scale for each image.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.At: torch.Tensor | None = None
        self.Bt: torch.Tensor | None = None
        self.mix: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, in)
        y = self.base(x)
        if self.mix is None:
            return y
        h = (x @ self.At) * self.mix[:, None, :]  # (B, N, R)
        return y + h @ self.Bt  # (B, N, out)


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
        parsed = lora_tensor_name(name)
        if parsed is None or parsed[0] not in targets:
            raise IncompatibleAdapterError(f"adapter {key}: tensor {name!r} targets no LoRA-ready module of the base")
        module, ab = parsed
        (A if ab == "A" else B)[module] = tensor.to(device=device, dtype=torch.float32)
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
        self._stack_of: tuple[LoraAdapter, ...] = ()
        self._stack: dict[str, dict[str, torch.Tensor]] = {}
        #: Batches fused per path (a mixture counts as gather when any layer gathered).
        self.paths = collections.Counter(dict.fromkeys(FUSION_PATHS, 0))

    @property
    def targets(self) -> dict[str, nn.Linear]:
        return {name: layer.base for name, layer in self.layers.items()}

    def _stacks(self, adapters: Sequence[LoraAdapter], name: str) -> dict[str, torch.Tensor]:
        """One layer's view of an adapter set: concatenated A^T/B^T with each rank row's owner
        and scale; the padded per-adapter stacks for the gather layout are added on demand."""
        present = [i for i, a in enumerate(adapters) if name in a.A]
        dtype = self.layers[name].base.weight.dtype  # fp16/bf16 bases fuse in their own precision
        ranks = [adapters[i].A[name].shape[0] for i in present]
        device = adapters[present[0]].A[name].device
        return {
            "At": torch.cat([adapters[i].A[name] for i in present]).T.to(dtype),  # (in, R)
            "Bt": torch.cat([adapters[i].B[name] for i in present], dim=1).T.to(dtype),  # (R, out)
            "owner": torch.tensor([i for i, r in zip(present, ranks) for _ in range(r)], device=device),
            "scale": torch.tensor([adapters[i].scale for i, r in zip(present, ranks) for _ in range(r)],
                                  device=device, dtype=dtype),
        }

    def _padded(self, adapters: Sequence[LoraAdapter], name: str, st: dict[str, torch.Tensor]) -> None:
        """Per-adapter stacks padded to the largest rank: (n, in, r), (n, r, out), (n, r)."""
        n, r_max = len(adapters), max(a.A[name].shape[0] for a in adapters if name in a.A)
        A = st["At"]
        st["At_pad"] = A.new_zeros(n, A.shape[0], r_max)
        st["Bt_pad"] = A.new_zeros(n, r_max, st["Bt"].shape[1])
        st["scale_pad"] = A.new_zeros(n, r_max)
        row = 0
        for i, a in enumerate(adapters):
            if name in a.A:
                r = a.A[name].shape[0]
                st["At_pad"][i, :, :r] = st["At"][:, row : row + r]
                st["Bt_pad"][i, :r] = st["Bt"][row : row + r]
                st["scale_pad"][i, :r] = a.scale
                row += r

    def set_mixture(self, adapters: Sequence[LoraAdapter], weights: torch.Tensor, layout: str = "auto") -> None:
        """Per-image fusion: ``weights`` (B, n_adapters), row b the fusion weights of image b.

        Two exact layouts of the same sum: ``concat`` multiplies every image by all the batch's
        adapters (one plain GEMM pair; rank = the batch's union), ``gather`` gives each image
        only its own top-k (a batched GEMM pair; rank = k x the largest rank). ``auto`` picks
        gather when the union is more than 2.5x larger (measured on CPU: below that the plain
        GEMMs of concat win; benchmarks/fusion.py). The stacks of the last adapter set are
        kept, so consecutive batches over the same adapters only recompute the scales.
        """
        if weights.ndim != 2 or weights.shape[1] != len(adapters):
            raise InvalidInputError(f"weights must be (batch, {len(adapters)}), got {tuple(weights.shape)}")
        if layout not in MIXTURE_LAYOUTS:
            raise InvalidInputError(f"unknown layout {layout!r}; valid: {', '.join(MIXTURE_LAYOUTS)}")
        same = len(adapters) == len(self._stack_of) and all(a is b for a, b in zip(adapters, self._stack_of))
        if not same:  # holding the adapters themselves (not ids) keeps this check sound
            self._stack_of = tuple(adapters)
            self._stack = {n: self._stacks(adapters, n) for n in self.layers if any(n in a.A for a in adapters)}
        k = int((weights != 0).sum(dim=1).max().clamp(min=1))
        vals, idx = weights.topk(k, dim=1)  # (B, k): each image's own adapters
        gathered = False
        for name, layer in self.layers.items():
            st = self._stack.get(name)
            if st is None:
                layer.mix = None
                continue
            w = weights.to(st["At"].dtype)
            r_max = max(a.A[name].shape[0] for a in adapters if name in a.A)
            use_gather = layout == "gather" or (layout == "auto" and st["owner"].numel() > 2.5 * k * r_max)
            if not use_gather:
                layer.At, layer.Bt = st["At"], st["Bt"]
                layer.mix = w[:, st["owner"]] * st["scale"]  # (B, R)
                continue
            gathered = True
            if "At_pad" not in st:
                self._padded(adapters, name, st)
            b = weights.shape[0]
            layer.At = st["At_pad"][idx].permute(0, 2, 1, 3).reshape(b, st["At"].shape[0], k * r_max)
            layer.Bt = st["Bt_pad"][idx].reshape(b, k * r_max, st["Bt"].shape[1])
            layer.mix = (vals.to(w.dtype)[..., None] * st["scale_pad"][idx]).reshape(b, k * r_max)
        self.paths["gather" if gathered else "concat"] += 1

    def clear(self) -> None:
        """Back to the plain base model (mixture off; merged weights are left to :meth:`unmerge`)."""
        for layer in self.layers.values():
            layer.mix = layer.At = layer.Bt = None

    @torch.no_grad()
    def merge(self, adapters: Sequence[LoraAdapter], weights: torch.Tensor, key: Hashable | None = None) -> None:
        """Write ``W + B_cat diag(w ⊗ s) A_cat`` into every layer (one weight vector (n,)).

        With a ``key``, a repeated call for the same key keeps the merged weights as they are
        (a stream of one domain merges once).
        """
        self.paths["merged"] += 1
        if key is not None and key == self._merged_key:
            return
        self.unmerge()
        self.clear()
        self._merged_key = key
        for name, layer in self.layers.items():
            if not any(name in a.A for a in adapters):
                continue
            st = self._stacks(adapters, name)
            scales = weights.to(st["At"].dtype)[st["owner"]] * st["scale"]  # (R,)
            weight = layer.base.weight
            self._originals[name] = weight.detach().clone()
            weight.add_(((st["At"] * scales) @ st["Bt"]).T.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every merged layer's original weight, bit-exactly."""
        for name, original in self._originals.items():
            self.layers[name].base.weight.copy_(original)
        self._originals.clear()
        self._merged_key = None
