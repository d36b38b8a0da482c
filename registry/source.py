"""Where the node's adapters come from: fetched from the registry, verified end to end, loaded.

:class:`BundleSource` is the one place a bundle is checked before use: the publisher's signature
by a key the registry lists, each file's hash, the listing against the signed manifest (name,
version, publisher, centroids, spread) and the weights against the base card. The adapter cache
calls it (fetch, then load) and never calls back into the node; the node only reads which
adapters failed (:attr:`failed`) to leave them out of retrieval.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from torch import nn

from semla.registry.basecheck import verify_against_card
from semla.registry.bundle import verify_bundle
from semla.registry.cache import adapter_key
from semla.registry.fusion import LoraAdapter, load_adapter
from semla.registry.http import RegistryClient
from semla.schemas import ADAPTER_WEIGHTS_FILE, BUNDLE_FILES, MANIFEST_FILE, AdapterSummary
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import IncompatibleAdapterError, VerificationError

__all__ = ["BundleSource"]


class BundleSource:
    """Fetches, verifies and loads the bundles of listed adapters for one base model.

    Attributes:
        trusted_keys: key id → raw public key of the publishers the library lists (set on each pull).
        failed: adapter key → why it failed verification; the node moves these out of retrieval.
    """

    def __init__(self, client: RegistryClient, card: BaseCard, base_fingerprint: str,
                 targets: Mapping[str, nn.Linear]) -> None:
        self.client = client
        self.card = card
        self.base_fingerprint = base_fingerprint
        self.targets = targets
        self.trusted_keys: dict[str, bytes] = {}
        self.failed: dict[str, str] = {}

    def fetch(self, summary: AdapterSummary) -> dict[str, bytes]:
        """Download one adapter's bundle (file name → bytes), unverified."""
        return {f: self.client.fetch_file(summary.name, summary.version, f) for f in BUNDLE_FILES}

    def load(self, summary: AdapterSummary, files: dict[str, bytes]) -> LoraAdapter:
        """Verify a bundle and load it as a CPU adapter; a failure is noted in :attr:`failed`.

        Raises:
            VerificationError, IncompatibleAdapterError: the bundle is not what was listed, or does not fit.
        """
        try:
            return self._check_and_load(summary, files)
        except (VerificationError, IncompatibleAdapterError) as exc:
            self.failed[adapter_key(summary)] = f"{exc.message} [{exc.code}]"
            raise

    def _check_and_load(self, summary: AdapterSummary, files: dict[str, bytes]) -> LoraAdapter:
        key = adapter_key(summary)
        manifest = verify_bundle(files, self.trusted_keys)
        if hashlib.sha256(files[MANIFEST_FILE]).hexdigest() != summary.manifest_sha256:
            raise VerificationError(f"{key}: manifest differs from the one the registry listed")
        if (manifest.name, manifest.version, manifest.publisher) != (summary.name, summary.version, summary.publisher):
            raise VerificationError(f"{key}: signed name/version/publisher differ from the listing")
        listed = np.asarray(summary.centroids, dtype=np.float64)
        signed = np.asarray(manifest.centroids.vectors, dtype=np.float64)
        if listed.shape != signed.shape or not np.allclose(listed, signed, atol=1e-6):
            raise VerificationError(f"{key}: listed centroids differ from the signed manifest")
        signed_spread = None if manifest.spread is None else list(manifest.spread.quantiles)
        if (summary.spread is None) != (signed_spread is None) or (
                signed_spread is not None and not np.allclose(summary.spread, signed_spread, atol=1e-9)):
            raise VerificationError(f"{key}: listed spread differs from the signed manifest")
        try:
            verify_against_card(self.card, manifest, files[ADAPTER_WEIGHTS_FILE])
        except IncompatibleAdapterError as exc:
            raise IncompatibleAdapterError(f"{key}: {exc.message}", code=exc.code) from None
        return load_adapter(key, files[ADAPTER_WEIGHTS_FILE], manifest, self.base_fingerprint, self.targets,
                            device="cpu")

    def verified_files(self, summary: AdapterSummary) -> dict[str, bytes]:
        """Download one listed adapter's bundle and verify it exactly as before use; its files."""
        files = self.fetch(summary)
        self.load(summary, files)
        return files
