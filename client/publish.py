"""Publishing a bundle: sign (optionally), verify locally, describe the payload, upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from semla.registry import keys as _keys
from semla.registry.bundle import lora_tensor_layout, parse_safetensors_header, read_bundle, sign_bundle, verify_bundle
from semla.registry.http import RegistryClient
from semla.schemas import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, Manifest, UploadReceipt

__all__ = ["describe_payload", "publish_bundle"]


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else k, value[k], out)
    elif prefix == "centroids.vectors":
        out.append((prefix, f"{len(value)} unit vector(s) x {len(value[0])} floats (aggregate, not per image)"))
    else:
        out.append((prefix, repr(value)))


def describe_payload(files: dict[str, bytes]) -> list[str]:
    """Human-readable lines listing every file (with byte counts), tensor and manifest field
    that an upload of ``files`` sends."""
    lines = [f"{len(files)} files, {sum(len(d) for d in files.values())} bytes in total:"]
    for name in sorted(files):
        lines.append(f"  {name}: {len(files[name])} bytes")
    layout = lora_tensor_layout(parse_safetensors_header(files[ADAPTER_WEIGHTS_FILE]))
    lines.append(f"{ADAPTER_WEIGHTS_FILE}: {2 * len(layout)} LoRA tensors")
    for info in layout.values():
        lines.append(f"  {info.module}: lora_A ({info.rank}, {info.in_features}) lora_B "
                     f"({info.out_features}, {info.rank}) {info.dtype}")
    fields: list[tuple[str, str]] = []
    _flatten("", Manifest.parse(files[MANIFEST_FILE]).model_dump(mode="json"), fields)
    lines.append(f"{MANIFEST_FILE} fields:")
    lines.extend(f"  {k} = {v}" for k, v in fields)
    return lines


def publish_bundle(
    bundle: Path, client: RegistryClient, *, key: Ed25519PrivateKey | None = None, dry_run: bool = False
) -> UploadReceipt | list[str]:
    """Sign (when ``key`` is given), verify locally, then upload ``bundle``.

    Local verification trusts the registry's active keys plus the caller's own key, so a
    bundle that the registry would refuse is caught before any byte leaves.

    Returns:
        The registry's receipt, or with ``dry_run`` the payload description (nothing is sent).

    Raises:
        VerificationError: the bundle fails local verification.
        RegistryError: the registry refused the upload (its code and message).
    """
    if key is not None:
        sign_bundle(bundle, key)
    files = read_bundle(bundle)
    trusted = {_keys.key_id(key): _keys.public_bytes(key)} if key is not None else {}
    if not dry_run or key is None:
        trusted = {**client.trusted_keys(), **trusted}
    verify_bundle(files, trusted)
    if dry_run:
        return describe_payload(files)
    return client.upload(files)
