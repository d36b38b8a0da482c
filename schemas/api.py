"""Request and response bodies of the registry's HTTP API (kept apart from ORM tables)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdapterSummary", "ErrorBody", "ErrorResponse", "KeyCreate", "KeyPublic", "UploadReceipt"]


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


class UploadReceipt(_Api):
    name: str
    version: int
    publisher: str
    manifest_sha256: str
