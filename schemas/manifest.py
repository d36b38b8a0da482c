"""The adapter manifest (DESIGN §3): what a data owner signs and publishes.

Unknown fields are rejected, never dropped: a verifier that silently ignored a field would let
a signer and a reader disagree about what was signed.
"""

from __future__ import annotations

import calendar
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semla.schemas._canonical import canonical_json, strict_json_loads
from semla.schemas.errors import ManifestError

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "BUNDLE_FILES",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "SIGNING_CONTEXT",
    "NAME_PATTERN",
    "BaseModelRef",
    "Centroids",
    "FederatedProvenance",
    "FileEntry",
    "Manifest",
    "Privacy",
    "Spread",
    "SPREAD_QUANTILES",
    "TrainingProvenance",
    "UpdatePrivacy",
    "signing_payload",
    "revocation_payload",
    "REVOCATION_CONTEXT",
    "rotation_payload",
    "ROTATION_CONTEXT",
]

#: The schema new manifests are written in. Version 2 adds the signed ``spread``; version-1
#: manifests (no ``spread``) stay valid and keep their exact canonical bytes.
MANIFEST_SCHEMA_VERSION = 2
#: Schema versions a verifier accepts.
MANIFEST_SCHEMA_VERSIONS = (1, 2)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
#: Every file of a bundle; the manifest lists hashes of the first two.
BUNDLE_FILES = (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, MANIFEST_FILE, SIGNATURE_FILE)
SIGNING_CONTEXT = b"semla-manifest-v1\n"
#: Adapter names: lower-case, no path separators, no leading dot.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_HEX64 = r"^[0-9a-f]{64}$"
#: Bounds of the manifest's numbers (documented in the README's security section). The database
#: stores counts and versions as signed 64-bit integers; these keep every value far inside.
MAX_SAMPLE_COUNT = 10**9
MAX_EPSILON = 100.0
MAX_COUNT = 10**6
MAX_STEPS = 10**9
MAX_FILE_SIZE = 2**40
#: A float that is finite; ``le``/``ge`` give the range.
_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Word = Annotated[str, Field(max_length=256)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseModelRef(_Frozen):
    """The exact base model an adapter was trained on."""

    arch: str = Field(min_length=1, max_length=128)
    tag: str = Field(max_length=256)
    open_clip_version: str = Field(max_length=64)
    fingerprint: str = Field(pattern=_HEX64)


class Centroids(_Frozen):
    """Retrieval keys: k unit vectors in the frozen base image-embedding space."""

    embedding_model: str = Field(min_length=1, max_length=256)
    vectors: list[list[float]] = Field(min_length=1, max_length=8)

    @field_validator("vectors")
    @classmethod
    def _unit_vectors(cls, vectors: list[list[float]]) -> list[list[float]]:
        dim = len(vectors[0])
        if dim < 2 or dim > 4096:
            raise ValueError(f"centroid dimension {dim} out of range 2..4096")
        for i, vec in enumerate(vectors):
            if len(vec) != dim:
                raise ValueError(f"centroid {i} has dimension {len(vec)}, expected {dim}")
            if not all(math.isfinite(x) for x in vec):
                raise ValueError(f"centroid {i} holds a non-finite value")
            norm = math.sqrt(sum(x * x for x in vec))
            if abs(norm - 1.0) > 1e-3:
                raise ValueError(f"centroid {i} is not a unit vector (norm {norm:.6f})")
        return vectors

    @property
    def dim(self) -> int:
        return len(self.vectors[0])


class Privacy(_Frozen):
    """How the published centroid was protected.

    ε lies in (0, 100] (beyond it a Gaussian release protects nothing, and a tiny ε paired with a
    huge δ would sidestep the registry's ε ledger); δ in (0, 1/sample_count] (checked by the
    manifest); the clip norm is positive.
    """

    mechanism: Literal["none", "gaussian"] = "none"
    epsilon: _Finite | None = Field(default=None, gt=0, le=MAX_EPSILON)
    delta: _Finite | None = Field(default=None, gt=0, lt=1)
    clip_norm: _Finite | None = Field(default=None, gt=0, le=1e6)
    min_samples: int = Field(ge=1, le=MAX_SAMPLE_COUNT)

    @model_validator(mode="after")
    def _consistent(self) -> "Privacy":
        if self.mechanism == "none" and any(
            v is not None for v in (self.epsilon, self.delta, self.clip_norm)
        ):
            raise ValueError("privacy mechanism 'none' cannot carry epsilon/delta/clip_norm")
        if self.mechanism == "gaussian":
            if self.epsilon is None or self.delta is None or self.epsilon <= 0:
                raise ValueError("gaussian mechanism needs epsilon > 0 and delta")
            if not 0 < self.delta < 1:
                raise ValueError("delta must lie in (0, 1)")
        return self


#: The quantiles a spread publishes, in this order.
SPREAD_QUANTILES = (0.5, 0.9, 0.99)


class Spread(_Frozen):
    """How spread an adapter's training embeddings are around its centroids (schema 2).

    The quantiles 0.5, 0.9 and 0.99 of the euclidean distances between each training image's
    unit embedding (frozen base, as for the centroid) and its nearest published centroid, in
    [0, 2]. Nodes measure a query's distance in units of this spread (the ``calibrated``
    weighting) and give the base model weight when a query lies beyond it (the guard).

    ``mechanism`` ``"none"``: exact quantiles of ``count`` distances. ``"gaussian-histogram"``
    (when the centroid is under DP): the quantiles of a histogram of the distances released with
    Gaussian noise, ``epsilon``/``delta`` being its share of the manifest's ``privacy`` budget
    (which covers centroid, count and spread together), ``bins`` equal bins over [0, 2];
    ``count`` is then the published (noisy) sample count.
    """

    distance: Literal["euclidean"] = "euclidean"
    q50: _Finite = Field(ge=0, le=2)
    q90: _Finite = Field(ge=0, le=2)
    q99: _Finite = Field(ge=0, le=2)
    count: int = Field(ge=1, le=MAX_SAMPLE_COUNT)
    mechanism: Literal["none", "gaussian-histogram"] = "none"
    epsilon: _Finite | None = Field(default=None, gt=0, le=MAX_EPSILON)
    delta: _Finite | None = Field(default=None, gt=0, lt=1)
    bins: int | None = Field(default=None, ge=1, le=4096)

    @model_validator(mode="after")
    def _ordered(self) -> "Spread":
        if not self.q50 <= self.q90 <= self.q99:
            raise ValueError(f"spread quantiles must be ordered q50 <= q90 <= q99, got {self.q50}, {self.q90}, {self.q99}")
        noisy = (self.epsilon, self.delta, self.bins)
        if self.mechanism == "none" and any(v is not None for v in noisy):
            raise ValueError("spread mechanism 'none' cannot carry epsilon/delta/bins")
        if self.mechanism == "gaussian-histogram" and any(v is None for v in noisy):
            raise ValueError("spread mechanism 'gaussian-histogram' needs epsilon, delta and bins")
        return self

    @property
    def quantiles(self) -> tuple[float, float, float]:
        return (self.q50, self.q90, self.q99)


class UpdatePrivacy(_Frozen):
    """Gaussian DP on the federated LoRA updates: each client's update clipped to ``clip_norm``
    (L2 over all its LoRA tensors), Gaussian noise of std ``noise_multiplier * clip_norm`` added
    to the sum; (epsilon, delta) over all rounds from the accountant named in ``accountant``."""

    clip_norm: _Finite = Field(gt=0, le=1e6)
    noise_multiplier: _Finite = Field(ge=0, le=1e6)
    epsilon: _Finite | None = Field(default=None, gt=0)
    delta: _Finite = Field(gt=0, lt=1)
    accountant: str = Field(min_length=1, max_length=64)


class FederatedProvenance(_Frozen):
    """How a federated adapter was trained (DESIGN §7): no individual owner's data left its machine."""

    rounds: int = Field(ge=1, le=MAX_COUNT)
    #: distinct owners whose updates were aggregated at least once
    participants: int = Field(ge=1, le=MAX_COUNT)
    secure_aggregation: bool
    #: local optimiser steps per owner per round
    local_steps: int = Field(default=1, ge=1, le=MAX_STEPS)
    #: least owners a round needed to proceed
    min_clients: int = Field(default=1, ge=1, le=MAX_COUNT)
    update_privacy: UpdatePrivacy | None = None


class TrainingProvenance(_Frozen):
    steps: int = Field(ge=0, le=MAX_STEPS)
    lr: _Finite = Field(ge=0, le=1e6)
    batch_size: int = Field(ge=1, le=MAX_COUNT)
    seed: int = Field(ge=-(2**63), lt=2**63)
    federated: FederatedProvenance | None = None


class FileEntry(_Frozen):
    sha256: str = Field(pattern=_HEX64)
    size: int = Field(ge=0, le=MAX_FILE_SIZE)


class Manifest(_Frozen):
    """Everything a node needs to decide whether to trust, retrieve and load an adapter."""

    schema_version: Literal[1, 2] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1, le=2**53)
    #: Key id of the signer; empty in a bundle that has not been signed yet.
    publisher: str = Field(pattern=r"^([0-9a-f]{16})?$")
    base_model: BaseModelRef
    target_modules: list[str] = Field(min_length=1, max_length=512)
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    vocabulary: list[_Word] = Field(min_length=1, max_length=1024)
    domain: str = Field(max_length=1024)
    centroids: Centroids
    sample_count: int = Field(ge=1, le=MAX_SAMPLE_COUNT)
    privacy: Privacy
    training: TrainingProvenance
    files: dict[str, FileEntry]
    created_at: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
    #: Schema 2 only (required there): the spread of the training embeddings around the centroids.
    #: Absent from version-1 manifests, whose nodes use the library's default (see
    #: :func:`semla.registry.weighting.fill_spreads`).
    spread: Spread | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("files")
    @classmethod
    def _exact_files(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        expected = {ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE}
        if set(files) != expected:
            raise ValueError(f"files must list exactly {sorted(expected)}, got {sorted(files)}")
        return files

    @field_validator("created_at")
    @classmethod
    def _real_date(cls, value: str) -> str:
        year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
        hour, minute, second = int(value[11:13]), int(value[14:16]), int(value[17:19])
        if not 2000 <= year <= 2200 or not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year, month)[1]:
            raise ValueError(f"created_at {value[:10]} is not a date between 2000 and 2200")
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"created_at {value[11:19]} is not a time of day")
        return value

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_.]{1,256}", name):
                raise ValueError(f"bad target module name {name!r}")
        return names

    @model_validator(mode="after")
    def _spread_vs_version(self) -> "Manifest":
        if self.schema_version == 1 and self.spread is not None:
            raise ValueError("a schema_version 1 manifest has no spread (it came with version 2)")
        if self.schema_version >= 2 and self.spread is None:
            raise ValueError(f"schema_version {self.schema_version} requires spread")
        if self.spread is not None:
            gaussian = self.privacy.mechanism == "gaussian"
            if gaussian != (self.spread.mechanism == "gaussian-histogram"):
                raise ValueError("the spread is released under DP exactly when the centroid is "
                                 f"(privacy {self.privacy.mechanism!r}, spread {self.spread.mechanism!r})")
            if gaussian:
                if not ((self.spread.epsilon or 0.0) < (self.privacy.epsilon or 0.0)
                        and (self.spread.delta or 0.0) < (self.privacy.delta or 0.0)):
                    raise ValueError("spread.epsilon/delta are a share of privacy.epsilon/delta and must be "
                                     "smaller than them")
        return self

    @model_validator(mode="after")
    def _samples_vs_privacy(self) -> "Manifest":
        if self.sample_count < self.privacy.min_samples:
            raise ValueError(
                f"sample_count {self.sample_count} is below the privacy minimum "
                f"{self.privacy.min_samples}"
            )
        delta = self.privacy.delta
        if delta is not None and delta * self.sample_count > 1.0:
            raise ValueError(
                f"privacy.delta {delta:g} exceeds 1/sample_count (1/{self.sample_count}): a release with "
                "that delta may expose one sample outright"
            )
        return self

    # -- encoding -----------------------------------------------------------------------------
    def to_canonical(self) -> bytes:
        """Canonical JSON of this manifest (what is written to manifest.json and signed).

        A version-1 manifest has no ``spread`` key at all, so its bytes are exactly those it
        was signed with before schema 2 existed.
        """
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def parse(cls, data: bytes | str) -> "Manifest":
        """Parse manifest bytes strictly.

        Raises:
            ManifestError: not strict JSON, an unknown or missing field, or a bad value.
        """
        raw = strict_json_loads(data, what="manifest.json")
        if not isinstance(raw, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise ManifestError(f"manifest field {where}: {first['msg']}") from None


REVOCATION_CONTEXT = b"semla-revoke-v1\n"


def revocation_payload(name: str, version: int) -> bytes:
    """The exact bytes a publisher signs to revoke one of its adapter versions."""
    return REVOCATION_CONTEXT + canonical_json({"name": name, "version": version})


ROTATION_CONTEXT = b"semla-rotate-v1\n"


def rotation_payload(old_key_id: str, new_public_key_hex: str) -> bytes:
    """The exact bytes the old key signs to hand over to a new publisher key."""
    return ROTATION_CONTEXT + canonical_json({"new_public_key": new_public_key_hex, "old_key_id": old_key_id})


def signing_payload(manifest: Manifest) -> bytes:
    """The exact bytes an Ed25519 manifest signature covers."""
    return SIGNING_CONTEXT + manifest.to_canonical()
