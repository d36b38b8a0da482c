"""Publishing a bundle: sign (optionally), verify locally, audit the payload, upload.

The payload listing (``publish --dry-run``) is :mod:`semla.client.audit`'s: one implementation
lists what ``semla-client audit`` and a dry run show, and it is exactly what the upload sends.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from semla.client.audit import AuditReport, audit_files, describe_payload
from semla.registry import keys as _keys
from semla.registry.bundle import read_bundle, sign_bundle, verify_bundle
from semla.registry.http import RegistryClient
from semla.registry.privacy import DEFAULT_MIN_SAMPLES, check_min_samples
from semla.schemas import UploadReceipt

__all__ = ["describe_payload", "publish_bundle"]


def publish_bundle(
    bundle: Path,
    client: RegistryClient,
    *,
    key: Ed25519PrivateKey | None = None,
    dry_run: bool = False,
    min_samples: int | None = None,
) -> UploadReceipt | AuditReport:
    """Sign (when ``key`` is given), verify locally, then upload ``bundle``.

    Local verification trusts the registry's active keys plus the caller's own key, so a
    bundle that the registry would refuse is caught before any byte leaves.

    Args:
        min_samples: refuse (before signing or sending) a centroid of fewer samples; a dry run
            flags it instead. The registry applies its own floor as well.

    Returns:
        The registry's receipt, or with ``dry_run`` the audit of the payload (nothing is sent).

    Raises:
        VerificationError: the bundle fails local verification.
        TooFewSamplesError: ``sample_count`` is below ``min_samples`` (nothing signed or sent).
        RegistryError: the registry refused the upload (its code and message).
    """
    floor = None if dry_run else min_samples
    if key is not None:
        sign_bundle(bundle, key, min_samples=floor)
    files = read_bundle(bundle)
    trusted = {_keys.key_id(key): _keys.public_bytes(key)} if key is not None else {}
    if not dry_run or key is None:
        trusted = {**client.trusted_keys(), **trusted}
    manifest = verify_bundle(files, trusted)
    if dry_run:
        return audit_files(files, min_samples=DEFAULT_MIN_SAMPLES if min_samples is None else min_samples)
    if floor is not None:
        check_min_samples(manifest.sample_count, floor, what=f"the centroid of {bundle}")
    return client.upload(files)
