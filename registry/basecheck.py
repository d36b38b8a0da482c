"""Does a verified adapter fit the base it names, and is its effect bounded? (torch-free)

The registry runs this on every upload (after :func:`semla.registry.bundle.check_bundle`) and
every node runs it again before loading an adapter, both against the base's
:class:`~semla.schemas.basecard.BaseCard`. Checked, each failure with its own code:

* the card: same fingerprint and arch (``base_mismatch``);
* retrieval keys: ``centroids.embedding_model`` is the card's embedding name
  (``embedding_mismatch``) and the centroids have its dimension (``centroid_dim``);
* ``rank`` and ``alpha`` within the card's bounds (``rank_too_large``, ``alpha_too_large``);
* every target is a LoRA target of the base (``unknown_target``); no zero-size tensor
  (``empty_tensor``); A is (r, in) and B is (out, r) of that target (``shape_mismatch``);
* every value finite (the safetensors parser) and ``|value| <= max_abs_value``
  (``value_too_large``);
* per layer, ``s ||B A||_F <= max_relative_effect * ||W||_F`` with s = alpha / r
  (``effect_too_large``), computed from the small factors: ``||B A||_F^2 = trace((B^T B)(A A^T))``,
  two r x r Gram matrices instead of the (out, in) product.

Fusion weights are convex (they sum to 1), so a fused delta is bounded by the same multiple of
``||W||_F``: no adapter can swamp the others, whatever its fusion weight.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from semla.registry.bundle import lora_tensor_name, parse_safetensors_header
from semla.schemas import ADAPTER_WEIGHTS_FILE, Manifest
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import IncompatibleAdapterError, TensorFormatError, UnknownBaseError

__all__ = ["CardReport", "check_against_card", "verify_against_card", "bundled_cards", "card_for", "BUNDLED_CARD_DIR"]

#: Cards of the bases that ship with the package (``semla-tiny``), one JSON file each.
BUNDLED_CARD_DIR = Path(__file__).resolve().parent / "base_cards"


def bundled_cards() -> dict[str, BaseCard]:
    """fingerprint → card of every base shipped in the package."""
    cards = {}
    for path in sorted(BUNDLED_CARD_DIR.glob("*.json")):
        card = BaseCard.parse(path.read_bytes(), what=f"bundled base card {path.name}")
        cards[card.fingerprint] = card
    return cards


def card_for(fingerprint: str, cards: Mapping[str, BaseCard]) -> BaseCard:
    """The card of ``fingerprint``.

    Raises:
        UnknownBaseError: ``unknown_base``, no card names it.
    """
    card = cards.get(fingerprint)
    if card is None:
        raise UnknownBaseError(
            f"base model {fingerprint[:16]} is unknown to this verifier (it knows {len(cards)} base(s)); "
            "an admin adds it with `semla-server bases add CARD.json`"
        )
    return card


@dataclasses.dataclass(frozen=True)
class CardReport:
    """Outcome of :func:`check_against_card`: the first failure, and each layer's relative effect
    ``s ||B A||_F / ||W||_F`` (as far as the check got)."""

    error: IncompatibleAdapterError | None
    effects: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.error is None


def _fail(code: str, message: str) -> IncompatibleAdapterError:
    return IncompatibleAdapterError(message, code=code)


def _tensor(body: memoryview, info: Mapping) -> np.ndarray:
    """A header entry's values as a float64 array of its shape."""
    begin, end = info["data_offsets"]
    raw = body[begin:end]
    if info["dtype"] == "BF16":  # bfloat16 is the high half of a float32
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype="<f4" if info["dtype"] == "F32" else "<f2")
    return values.astype(np.float64).reshape(info["shape"])


def _check_manifest(card: BaseCard, manifest: Manifest) -> None:
    ref = manifest.base_model
    if ref.fingerprint != card.fingerprint or ref.arch != card.arch:
        raise _fail("base_mismatch", f"adapter names base {ref.arch} ({ref.fingerprint[:16]}), the card is for "
                                     f"{card.arch} ({card.fingerprint[:16]})")
    space = manifest.centroids.embedding_model
    if space != card.embedding.name:
        raise _fail("embedding_mismatch", f"centroids.embedding_model is {space!r}; base {card.arch} retrieves in "
                                          f"{card.embedding.name!r}")
    if manifest.centroids.dim != card.embedding.dim:
        raise _fail("centroid_dim", f"centroids.vectors have dimension {manifest.centroids.dim}; the embedding "
                                    f"{card.embedding.name!r} has {card.embedding.dim}")
    bounds = card.bounds
    if manifest.rank > bounds.max_rank:
        raise _fail("rank_too_large", f"rank {manifest.rank} is above the base card's max_rank {bounds.max_rank}")
    if manifest.alpha > bounds.max_alpha:
        raise _fail("alpha_too_large", f"alpha {manifest.alpha:g} is above the base card's max_alpha "
                                       f"{bounds.max_alpha:g}")
    for module in manifest.target_modules:
        if module not in card.targets:
            raise _fail("unknown_target", f"target module {module!r} is not a LoRA target of base {card.arch}")


def check_against_card(card: BaseCard, manifest: Manifest, weights: bytes) -> CardReport:
    """Check a bundle's manifest and ``adapter_model.safetensors`` bytes against ``card``.

    The manifest is taken as verified (signature, hashes, adapter config): run after
    :func:`~semla.registry.bundle.check_bundle`. Nothing here trusts the header further than
    the safetensors parser's own checks.
    """
    effects: dict[str, float] = {}
    try:
        _check_manifest(card, manifest)
        try:
            header = parse_safetensors_header(weights)
        except TensorFormatError as exc:  # the bundle check names it first; here it is unfit too
            raise _fail("tensor_format", str(exc)) from None
        (n,) = struct.unpack("<Q", weights[:8])
        body = memoryview(weights)[8 + n :]
        pairs: dict[str, dict[str, Mapping]] = {}
        for name, info in header.items():
            parsed = lora_tensor_name(name)
            if parsed is None or parsed[0] not in card.targets:
                raise _fail("unknown_target", f"{ADAPTER_WEIGHTS_FILE}: tensor {name!r} targets no LoRA target "
                                              f"of base {card.arch}")
            if 0 in info["shape"] or len(info["shape"]) != 2:
                raise _fail("empty_tensor" if 0 in info["shape"] else "shape_mismatch",
                            f"{ADAPTER_WEIGHTS_FILE}: tensor {name!r} has shape {info['shape']}")
            pairs.setdefault(parsed[0], {})[parsed[1]] = info
        if sorted(pairs) != sorted(manifest.target_modules):
            raise _fail("shape_mismatch", f"{ADAPTER_WEIGHTS_FILE}: LoRA modules differ from the manifest's "
                                          "target_modules")
        bounds, r = card.bounds, manifest.rank
        scale = manifest.alpha / r
        for module, ab in sorted(pairs.items()):
            target = card.targets[module]
            want = {"A": [r, target.in_features], "B": [target.out_features, r]}
            for part in ("A", "B"):
                got = ab.get(part, {}).get("shape")
                if got != want[part]:
                    raise _fail("shape_mismatch", f"{ADAPTER_WEIGHTS_FILE}: {module}.lora_{part} has shape {got}; "
                                                  f"base {card.arch} needs {want[part]} (rank {r})")
            a, b = _tensor(body, ab["A"]), _tensor(body, ab["B"])
            for part, t in (("A", a), ("B", b)):
                peak = float(np.abs(t).max())
                if peak > bounds.max_abs_value:
                    raise _fail("value_too_large", f"{ADAPTER_WEIGHTS_FILE}: {module}.lora_{part} holds |value| "
                                                   f"{peak:.3g} > max_abs_value {bounds.max_abs_value:g}")
            gram = float(np.sum((b.T @ b) * (a @ a.T)))  # ||B A||_F^2 = trace((B^T B)(A A^T))
            effect = scale * math.sqrt(max(gram, 0.0)) / target.weight_norm
            effects[module] = effect
            if not effect <= bounds.max_relative_effect:
                raise _fail("effect_too_large", f"{module}: ||s B A||_F is {effect:.3g} x ||W||_F of the base layer, "
                                                f"above max_relative_effect {bounds.max_relative_effect:g}")
    except IncompatibleAdapterError as exc:
        return CardReport(error=exc, effects=effects)
    return CardReport(error=None, effects=effects)


def verify_against_card(card: BaseCard, manifest: Manifest, weights: bytes) -> dict[str, float]:
    """Raising twin of :func:`check_against_card`; returns each layer's relative effect.

    Raises:
        IncompatibleAdapterError: the first misfit, its code naming the rule.
    """
    report = check_against_card(card, manifest, weights)
    if report.error is not None:
        raise report.error
    return report.effects
