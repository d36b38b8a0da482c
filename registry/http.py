"""A small client for the registry's HTTP API, shared by the client kit and inference nodes.

It takes an injected ``httpx.Client`` (tests pass one with a ``MockTransport`` or an ASGI
transport); every non-2xx answer becomes a :class:`RegistryError` carrying the registry's own
error code and message.

The registry's listings are paged (``Link: <...>; rel="next"``); ``list_*`` follow every page and
``iter_*`` yield one item at a time. Only the next page's ``cursor`` is taken from the link: the
request always goes to this client's registry URL, whatever host a hostile answer names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from semla.schemas import (
    AdapterSummary,
    KeyPublic,
    PrivacyLedger,
    UploadReceipt,
)
from semla.schemas.errors import RegistryError

__all__ = ["RegistryClient", "PAGE_SIZE", "MAX_PAGES"]

T = TypeVar("T")

#: Items asked for per page of a listing (the registry serves at most 1000).
PAGE_SIZE = 500
#: Pages one listing may take before the client gives up (a registry that never stops paging).
MAX_PAGES = 100_000


def _next_cursor(response: httpx.Response) -> str | None:
    """The ``cursor`` of the ``rel="next"`` link, or None on the last page."""
    link = response.links.get("next")
    if link is None:
        return None
    cursors = parse_qs(urlsplit(link.get("url", "")).query).get("cursor")
    if not cursors or len(cursors[0]) > 4096:
        raise RegistryError("the registry's next-page link carries no usable cursor", code="bad_page")
    return cursors[0]


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

    def _pages(self, path: str, parse: Callable[[object], T], params: Mapping[str, str] | None = None,
               page_size: int | None = None) -> Iterator[T]:
        """Every item of a paged listing, following ``rel="next"`` links."""
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            query = {**(params or {}), "limit": str(page_size or PAGE_SIZE), **({"cursor": cursor} if cursor else {})}
            response = self._request("GET", path, params=query)
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, list):
                raise RegistryError(f"GET {path} did not answer a JSON list", code="bad_page")
            yield from (parse(item) for item in body)
            cursor = _next_cursor(response)
            if cursor is None:
                return
            if cursor in seen:
                raise RegistryError(f"GET {path}: the registry handed out the same cursor twice", code="bad_page")
            seen.add(cursor)
        raise RegistryError(f"GET {path}: more than {MAX_PAGES} pages", code="bad_page")

    def iter_keys(self) -> Iterator[KeyPublic]:
        """Every publisher key, oldest first, one page at a time."""
        return self._pages("/v1/keys", KeyPublic.model_validate)

    def list_keys(self) -> list[KeyPublic]:
        return list(self.iter_keys())

    def privacy_ledger(self, key_id: str) -> PrivacyLedger:
        """The DP epsilon a publisher has spent on centroids (its whole rotation chain), its budget and entries."""
        return PrivacyLedger.model_validate(self._request("GET", f"/v1/keys/{key_id}/privacy").json())

    def iter_adapters(self, *, domain: str | None = None) -> Iterator[AdapterSummary]:
        """The newest live version of every adapter (``domain``: substring filter), by name, page by page."""
        return self._pages("/v1/adapters", AdapterSummary.model_validate, {"domain": domain} if domain else None)

    def list_adapters(self, *, domain: str | None = None) -> list[AdapterSummary]:
        return list(self.iter_adapters(domain=domain))

    def adapter_versions(self, name: str) -> list[AdapterSummary]:
        """Every stored version of ``name`` (revoked ones included), newest first."""
        return list(self._pages(f"/v1/adapters/{name}", AdapterSummary.model_validate))

    def upload(self, files: Mapping[str, bytes]) -> UploadReceipt:
        parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
        return UploadReceipt.model_validate(self._request("POST", "/v1/adapters", files=parts).json())

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
