"""Request and response bodies of the registry's HTTP API (kept apart from ORM tables)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AdapterSummary",
    "ErrorBody",
    "ErrorResponse",
    "KeyCreate",
    "KeyPublic",
    "PrivacyLedger",
    "PrivacySpend",
    "RetrieveRequest",
    "MIN_TEMPERATURE",
    "MAX_TEMPERATURE",
    "MAX_EMBEDDING_ABS",
    "MAX_GUARD_Z",
    "RetrieveResponse",
    "RetrievedAdapter",
    "Contribution",
    "DEFAULT_TOP_K",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_DISTANCE",
    "DEFAULT_WEIGHTING",
    "DISTANCES",
    "RevokeRequest",
    "RotateRequest",
    "IndexKey",
    "UploadReceipt",
]


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Api):
    code: str
    message: str


class ErrorResponse(_Api):
    error: ErrorBody


class KeyCreate(_Api):
    """Register a publisher's Ed25519 public key (raw 32 bytes, hex)."""

    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw Ed25519 public key, hex")
    label: str = Field(default="", max_length=128)


class KeyPublic(_Api):
    key_id: str
    public_key: str
    label: str
    active: bool
    created_at: str
    rotated_to: str | None = None
    #: DP ε spent on centroids by this key's publisher: every key of its rotation chain together.
    epsilon_spent: float = 0.0


class PrivacySpend(_Api):
    """One entry of a privacy ledger: an adapter version whose centroid was released with DP."""

    name: str
    version: int
    key_id: str = Field(description="the key that signed it")
    epsilon: float
    delta: float
    created_at: str
    revoked: bool = Field(description="revoking a version refunds nothing: its centroid was public")


class PrivacyLedger(_Api):
    """A publisher's DP spend on centroids against the registry's budget.

    One publisher = one rotation chain of keys (oldest first in ``keys``): a rotated key's spend
    carries to the keys after it, so a new key never starts a fresh budget. ``spent`` and
    ``delta_spent`` add up by basic composition. ``budget`` and ``remaining`` are null when the
    registry sets no limit.
    """

    key_id: str
    keys: list[str]
    budget: float | None
    spent: float
    delta_spent: float
    remaining: float | None
    entries: list[PrivacySpend]


class AdapterSummary(_Api):
    """One adapter version as listed by ``GET /v1/adapters``.

    The centroids are included so a node can retrieve locally (its query never leaves it); a
    node re-checks them against the signed manifest before it uses the adapter.
    """

    name: str
    version: int
    publisher: str
    base_fingerprint: str
    domain: str
    sample_count: int
    manifest_sha256: str
    centroids: list[list[float]]
    created_at: str
    revoked: bool = False
    #: The signed manifest's spread quantiles [q50, q90, q99] (schema 2); absent for version-1
    #: manifests (the key is left out entirely, so documents listing only version-1 adapters
    #: keep their exact bytes). A node re-checks it against the signed manifest, like the centroids.
    spread: list[float] | None = Field(default=None, min_length=3, max_length=3, exclude_if=lambda v: v is None)

    @field_validator("spread")
    @classmethod
    def _spread_values(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) and 0.0 <= x <= 2.0 for x in v):
            raise ValueError("spread quantiles must be finite numbers in [0, 2]")
        return v


class UploadReceipt(_Api):
    name: str
    version: int
    publisher: str
    manifest_sha256: str


#: Retrieval defaults, shared by the node, its service, the CLIs and ``POST /v1/retrieve``
#: (top-5 and Euclidean distance as in the released SemLA configuration).
DEFAULT_TOP_K = 5
#: None: each weighting scheme's own default temperature (``semla.registry.weighting``).
DEFAULT_TEMPERATURE: float | None = None
DEFAULT_DISTANCE = "euclidean"
#: The weighting scheme used where none is named (``semla.registry.weighting`` holds them all).
DEFAULT_WEIGHTING = "calibrated"
#: Registered distance names (between unit vectors).
DISTANCES = ("euclidean", "cosine")

#: Softmax temperatures accepted anywhere (node API and CLI, ``POST /v1/retrieve``): distances
#: between unit vectors lie in [0, 2], so T in [1e-3, 1e3] keeps every weight finite.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3
#: guard_z (the base's position in the ``calibrated`` weighting's spread units) lies in [0, MAX_GUARD_Z].
MAX_GUARD_Z = 1e3
#: Largest |value| of a query embedding component (embeddings are normalised anyway; this keeps
#: the square sum finite in float32).
MAX_EMBEDDING_ABS = 1e6


class RetrieveRequest(_Api):
    """Server-side retrieval for thin clients (a node retrieves locally and never sends this)."""

    embedding: list[float] = Field(min_length=2, max_length=4096, description="the query image's embedding")
    base_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$", description="only adapters of this base model")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, le=100)
    temperature: float | None = Field(default=DEFAULT_TEMPERATURE, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE,
                                      description="the weighting's temperature; null: the scheme's default "
                                                  "(calibrated 0.5 in spread units, neg-distance and paper 0.05)")
    distance: Literal[DISTANCES] = DEFAULT_DISTANCE
    weighting: str = Field(default=DEFAULT_WEIGHTING, min_length=1, max_length=64,
                           description="weighting scheme: calibrated (default), neg-distance or paper; "
                                       "an unknown name is a 400 unknown_weighting")
    guard: bool = Field(default=False, description="the base model (a zero adapter) is weighed against the nearest "
                                                   "adapter; the adapters' weights then sum to 1 - base_weight")
    guard_z: float | None = Field(default=None, ge=0, le=MAX_GUARD_Z,
                                  description="the base's position in the library's distance unit u; null: the "
                                              "library's default")

    @field_validator("embedding")
    @classmethod
    def _finite_nonzero(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) and abs(x) <= MAX_EMBEDDING_ABS for x in v):
            raise ValueError(f"embedding values must be finite numbers within +-{MAX_EMBEDDING_ABS:g}")
        if not any(v):
            raise ValueError("embedding is all zeros")
        return v


class RetrievedAdapter(_Api):
    """One adapter's part in a retrieval: the row the registry, the node and its service all report."""

    name: str
    version: int
    publisher: str
    distance: float
    weight: float


#: The same row, as the node calls it (an image's contributions).
Contribution = RetrievedAdapter


class RetrieveResponse(_Api):
    """Nearest adapters first, with their fusion weights under the requested weighting scheme.

    The weights sum to ``1 - base_weight``: ``base_weight`` is 0 without the guard, and with it
    the share of the base model (a zero adapter), so fusing exactly with these weights already
    means fusing with the base."""

    results: list[RetrievedAdapter]
    base_weight: float = 0.0
    weighting: str = DEFAULT_WEIGHTING


class RevokeRequest(_Api):
    """A publisher's signed revocation of one of its adapter versions."""

    signature: str = Field(pattern=r"^[0-9a-f]{128}$",
                           description="Ed25519 signature (hex) over semla-revoke-v1 + canonical {name, version}")


class IndexKey(_Api):
    """A publisher key as the TUF key list (``keys/publishers.json``) names it."""

    key_id: str
    public_key: str


class RotateRequest(_Api):
    """Hand a publisher's names over to a new key, signed by the old key."""

    old_key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    new_public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw Ed25519 public key, hex")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="by the old key over semla-rotate-v1 + "
                           "canonical {new_public_key, old_key_id}")
