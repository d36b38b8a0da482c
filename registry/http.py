"""A small client for the registry's HTTP API, shared by the client kit and inference nodes.

It takes an injected ``httpx.Client`` (tests pass one with a ``MockTransport`` or an ASGI
transport); every non-2xx answer becomes a :class:`RegistryError` carrying the registry's own
error code and message.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from semla.schemas import (
    AdapterSummary,
    IndexKey,
    JsonLimits,
    KeyPublic,
    PrivacyLedger,
    UploadReceipt,
    strict_json_loads,
)
from semla.schemas.errors import RegistryError

__all__ = ["RegistryClient", "INDEX_JSON_LIMITS"]

#: The signed index is parsed within these bounds before its signature is checked, so a hostile
#: registry or network cannot crash a node with a deeply nested or oversized document.
INDEX_JSON_LIMITS = JsonLimits(max_bytes=1 << 30, max_depth=8, max_containers=10**7)


class RegistryClient:
    """Typed calls to one registry.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8080``.
        client: an ``httpx.Client`` to use (default: a new one with ``timeout``).
    """

    def __init__(self, url: str, *, client: httpx.Client | None = None, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise RegistryError(f"registry URL must start with http:// or https://, got {url!r}", code="bad_url")
        self.url = url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout)

    @property
    def http(self) -> httpx.Client:
        """The underlying httpx client (TUF downloads go through it)."""
        return self._client

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._client.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"cannot reach registry at {self.url}: {exc}", code="unreachable") from None
        if response.is_success:
            return response
        code, message = "http_error", response.text[:200] or response.reason_phrase
        try:
            body = response.json()["error"]
            code, message = body["code"], body["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise RegistryError(message, code=code, status=response.status_code)

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def register_key(self, public_key_hex: str, token: str, label: str = "") -> KeyPublic:
        r = self._request("POST", "/v1/keys", json={"public_key": public_key_hex, "label": label},
                          headers={"Authorization": f"Bearer {token}"})
        return KeyPublic.model_validate(r.json())

    def list_keys(self) -> list[KeyPublic]:
        return [KeyPublic.model_validate(k) for k in self._request("GET", "/v1/keys").json()]

    def privacy_ledger(self, key_id: str) -> PrivacyLedger:
        """The DP epsilon a publisher has spent on centroids (its whole rotation chain), its budget and entries."""
        return PrivacyLedger.model_validate(self._request("GET", f"/v1/keys/{key_id}/privacy").json())

    def list_adapters(self) -> list[AdapterSummary]:
        return [AdapterSummary.model_validate(a) for a in self._request("GET", "/v1/adapters").json()]

    def upload(self, files: Mapping[str, bytes]) -> UploadReceipt:
        parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
        return UploadReceipt.model_validate(self._request("POST", "/v1/adapters", files=parts).json())

    def signed_index(self) -> dict:
        """The registry's signed index snapshot, as raw JSON (the node verifies it).

        Raises:
            ManifestError: the document exceeds :data:`INDEX_JSON_LIMITS` or is not strict JSON.
        """
        return strict_json_loads(self._request("GET", "/v1/index").content, what="the registry's index",
                                 limits=INDEX_JSON_LIMITS)

    def registry_key(self) -> bytes:
        """The registry's raw public key as it announces it (pin it; better: get it out of band)."""
        return bytes.fromhex(IndexKey.model_validate(self._request("GET", "/v1/registry-key").json()).public_key)

    def rotate_key(self, old_key_id: str, new_public_key_hex: str, signature: bytes) -> KeyPublic:
        r = self._request("POST", "/v1/keys/rotate", json={
            "old_key_id": old_key_id, "new_public_key": new_public_key_hex, "signature": signature.hex()})
        return KeyPublic.model_validate(r.json())

    def revoke(self, name: str, version: int, signature: bytes) -> AdapterSummary:
        r = self._request("POST", f"/v1/adapters/{name}/{version}/revoke", json={"signature": signature.hex()})
        return AdapterSummary.model_validate(r.json())

    def fetch_file(self, name: str, version: int, filename: str) -> bytes:
        return self._request("GET", f"/v1/adapters/{name}/{version}/files/{filename}").content

    def trusted_keys(self) -> dict[str, bytes]:
        """key id → raw public key of every active publisher key the registry lists."""
        return {k.key_id: bytes.fromhex(k.public_key) for k in self.list_keys() if k.active}
