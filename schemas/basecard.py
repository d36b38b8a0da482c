"""The base card: what the registry and nodes know about a base model an adapter may name.

A signed adapter can still be unfit for its base (shapes that do not fit its layers, centroids
in another embedding space) or swamp every adapter it is fused with (``lora_alpha`` 1e30,
weights 1e18). The card holds what a torch-free check needs to refuse both: the fingerprint,
the open_clip arch, each LoRA target's input and output size and the Frobenius norm of its
base weight ``||W||_F``, the retrieval embedding's name and dimension, and the bounds below.

Cards are computed from a loaded model on any machine with torch (``semla-node base-card``),
installed on a registry with ``semla-server bases add CARD.json`` and shipped in the package
for the bundled bases. Unknown fields are rejected, like in the manifest.

Bounds (defaults, chosen far above what training produces; see the README):

* ``max_rank`` 256 and ``max_alpha`` 1024: peft's usual ranks are 4..64 with alpha = r..2r;
* ``max_relative_effect`` 1.0: per layer, ``||s B A||_F <= 1.0 * ||W||_F`` (s = alpha / r), a
  change as large as the base layer itself;
* ``max_abs_value`` 1e3: largest |value| in any A or B tensor (peft initialises A at
  ~1/sqrt(in) and B at 0; large factors overflow low-precision fusion even when B A is small).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from semla.schemas._canonical import canonical_json, strict_json_loads
from semla.schemas.errors import InvalidInputError, ManifestError

__all__ = ["BaseCard", "CardBounds", "EmbeddingSpec", "TargetLayer", "BASE_CARD_SCHEMA_VERSION", "MAX_CARD_BYTES"]

BASE_CARD_SCHEMA_VERSION = 1
#: Largest card file read anywhere (ViT-L-14 with 6 targets x 24 blocks is ~30 KB).
MAX_CARD_BYTES = 4 * 1024 * 1024
_HEX64 = r"^[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TargetLayer(_Frozen):
    """One LoRA-targeted ``nn.Linear`` of the base: ``A`` is (r, in), ``B`` is (out, r)."""

    in_features: int = Field(ge=1, le=1 << 20)
    out_features: int = Field(ge=1, le=1 << 20)
    #: ``||W||_F`` of the base weight, the yardstick of the effect bound.
    weight_norm: float = Field(gt=0, le=1e12)


class EmbeddingSpec(_Frozen):
    """The retrieval embedding space every centroid of this base must live in."""

    name: str = Field(min_length=1, max_length=256)
    dim: int = Field(ge=2, le=4096)


class CardBounds(_Frozen):
    """Limits on an adapter of this base (defaults documented in the module docstring)."""

    max_rank: int = Field(default=256, ge=1, le=4096)
    max_alpha: float = Field(default=1024.0, gt=0, le=1e6)
    max_relative_effect: float = Field(default=1.0, gt=0, le=1e3)
    max_abs_value: float = Field(default=1e3, gt=0, le=1e6)


class BaseCard(_Frozen):
    """What an adapter is checked against before the registry stores it or a node loads it."""

    schema_version: int = Field(default=BASE_CARD_SCHEMA_VERSION, ge=1, le=BASE_CARD_SCHEMA_VERSION)
    arch: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(pattern=_HEX64)
    embedding: EmbeddingSpec
    targets: dict[str, TargetLayer] = Field(min_length=1, max_length=8192)
    bounds: CardBounds = CardBounds()

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: dict[str, TargetLayer]) -> dict[str, TargetLayer]:
        for name in targets:
            if not name or len(name) > 256 or not all(c.isalnum() or c in "._" for c in name):
                raise ValueError(f"bad target module name {name!r}")
        return targets

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys), what ``semla-node base-card`` writes."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def parse(cls, data: bytes | str, *, what: str = "base card") -> "BaseCard":
        """Parse a card strictly.

        Raises:
            InvalidInputError: ``bad_base_card``: too large, not strict JSON, an unknown or bad field.
        """
        if len(data) > MAX_CARD_BYTES:
            raise InvalidInputError(f"{what} is larger than {MAX_CARD_BYTES} bytes", code="bad_base_card")
        try:
            raw = strict_json_loads(data, what=what)
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "card"
            raise InvalidInputError(f"{what} field {where}: {first['msg']}", code="bad_base_card") from None
        except ManifestError as exc:  # not strict JSON
            raise InvalidInputError(exc.message, code="bad_base_card") from None
        except RecursionError:
            raise InvalidInputError(f"{what} is nested too deeply", code="bad_base_card") from None
