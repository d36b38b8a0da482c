"""Build valid, signed adapter bundles without torch, and tampered variants of them.

A plain module (tests/ has no ``__init__.py``): ``import bundle_factory``. Tensors are tiny
peft-named LoRA pairs written with ``safetensors.numpy``; the bundle goes through the real
``write_bundle`` + ``sign_bundle``, so it is exactly what a data owner would publish.

Typical use::

    key = keys.generate_key()
    files = bundle_factory.make_bundle_files(tmp_path, key, name="city-streets", version=1)
    bad = bundle_factory.flip_byte(files)                       # -> hash_mismatch
    bad = bundle_factory.edit_manifest(files, lambda m: m.update(domain="x"))  # -> bad_signature
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from semla.registry import keys
from semla.registry.bundle import read_bundle, sha256_bytes, sign_bundle, write_bundle
from semla.schemas import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE, SIGNING_CONTEXT, canonical_json
from semla.schemas.basecard import BaseCard, CardBounds, EmbeddingSpec, TargetLayer

__all__ = [
    "MODULES",
    "FINGERPRINT",
    "lora_weights",
    "adapter_config",
    "unit_vectors",
    "manifest_fields",
    "make_bundle",
    "make_bundle_files",
    "flip_byte",
    "edit_manifest",
    "replace_file",
    "resign",
    "base_card",
    "install_base_card",
]

#: LoRA targets: module name -> (in_features, out_features).
MODULES: dict[str, tuple[int, int]] = {
    "visual.transformer.resblocks.0.attn.q_proj": (16, 16),
    "visual.transformer.resblocks.0.attn.v_proj": (16, 16),
    "visual.transformer.resblocks.0.mlp.c_fc": (16, 64),
}
#: A stand-in base-model fingerprint (64 hex).
FINGERPRINT = "ab" * 32
#: Centroid space and dimension of the stand-in base.
EMBEDDING, DIM = "semla-tiny", 8
#: ||W||_F of every stand-in target layer (the factory's adapters reach ~0.3 of it).
WEIGHT_NORM = 4.0


def lora_weights(modules: Mapping[str, tuple[int, int]] = MODULES, *, rank: int = 4, seed: int = 0) -> bytes:
    """safetensors bytes with ``lora_A`` (r, in) and ``lora_B`` (out, r) per module."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (fan_in, fan_out) in modules.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(np.float32) * 0.01
    return save_safetensors(tensors)


def adapter_config(modules: Mapping[str, tuple[int, int]] = MODULES, *, rank: int = 4, alpha: float = 8.0) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(modules)}


def unit_vectors(k: int = 1, dim: int = 8, *, seed: int = 0) -> list[list[float]]:
    """``k`` random unit vectors of dimension ``dim`` (as plain floats)."""
    rng = np.random.default_rng(seed + 1000)
    out = []
    for _ in range(k):
        vec = rng.standard_normal(dim)
        vec /= math.sqrt(float(vec @ vec))
        out.append([float(x) for x in vec])
    return out


def manifest_fields(
    *,
    name: str = "city-streets",
    version: int = 1,
    rank: int = 4,
    alpha: float = 8.0,
    modules: Mapping[str, tuple[int, int]] = MODULES,
    domain: str = "urban street scenes",
    sample_count: int = 64,
    k: int = 1,
    dim: int = DIM,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Every manifest field except ``files`` and ``publisher`` (``write_bundle`` sets those)."""
    fields: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "base_model": {"arch": "semla-tiny", "tag": "", "open_clip_version": "3.3.0", "fingerprint": FINGERPRINT},
        "target_modules": sorted(modules),
        "rank": rank,
        "alpha": alpha,
        "vocabulary": ["road", "car", "building", "sky"],
        "domain": domain,
        "centroids": {"embedding_model": EMBEDDING, "vectors": unit_vectors(k, dim, seed=seed)},
        "sample_count": sample_count,
        "privacy": {"mechanism": "none", "min_samples": 50},
        "training": {"steps": 10, "lr": 1e-3, "batch_size": 4, "seed": seed},
        "created_at": "2026-01-01T00:00:00Z",
    }
    fields.update(overrides)
    return fields


def base_card(**bounds: Any) -> BaseCard:
    """The card of the stand-in base the factory's bundles name (``bounds`` override the defaults)."""
    targets = {m: TargetLayer(in_features=i, out_features=o, weight_norm=WEIGHT_NORM) for m, (i, o) in MODULES.items()}
    return BaseCard(arch="semla-tiny", fingerprint=FINGERPRINT, embedding=EmbeddingSpec(name=EMBEDDING, dim=DIM),
                    targets=targets, bounds=CardBounds(**bounds))


def install_base_card(data_dir: Path, **bounds: Any) -> BaseCard:
    """Add the stand-in base's card to a registry data directory (``semla-server bases add``)."""
    from semla.server.bases import BaseCardStore

    return BaseCardStore(Path(data_dir) / "bases").add(base_card(**bounds).to_json())


def make_bundle(out: Path, key: Any, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, **fields: Any) -> Path:
    """Write and sign a bundle directory at ``out`` (must not exist); returns ``out``.

    ``fields`` go to :func:`manifest_fields` (name, version, domain, sample_count, ...).
    """
    write_bundle(
        out,
        weights=lora_weights(rank=rank, seed=seed),
        adapter_config=adapter_config(rank=rank, alpha=alpha),
        manifest_fields=manifest_fields(rank=rank, alpha=alpha, seed=seed, **fields),
    )
    sign_bundle(out, key)
    return out


def make_bundle_files(tmp_path: Path, key: Any, **kwargs: Any) -> dict[str, bytes]:
    """A signed bundle as file name -> bytes (written under a fresh dir in ``tmp_path``)."""
    root = Path(tmp_path) / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"bundle-{len(list(root.iterdir()))}"
    return read_bundle(make_bundle(out, key, **kwargs))


# -- tampering ------------------------------------------------------------------------------------
def resign(files: Mapping[str, bytes], key: Any) -> dict[str, bytes]:
    """Sign manifest.json's bytes as they are (even if the schema would refuse them)."""
    raw = json.loads(files[MANIFEST_FILE])
    out = dict(files)
    out[MANIFEST_FILE] = canonical_json(raw)
    out[SIGNATURE_FILE] = keys.sign(key, SIGNING_CONTEXT + out[MANIFEST_FILE])
    return out


def flip_byte(files: Mapping[str, bytes], filename: str = ADAPTER_WEIGHTS_FILE, offset: int = -1) -> dict[str, bytes]:
    """Copy of ``files`` with one bit flipped in one byte of ``filename`` (default: the last)."""
    data = bytearray(files[filename])
    data[offset] ^= 0x01
    return {**files, filename: bytes(data)}


def edit_manifest(
    files: Mapping[str, bytes], change: Callable[[dict], None], *, resign_with: Any = None
) -> dict[str, bytes]:
    """Apply ``change`` to the manifest's JSON dict; re-sign only when ``resign_with`` is a key."""
    raw = json.loads(files[MANIFEST_FILE])
    change(raw)
    out = {**files, MANIFEST_FILE: canonical_json(raw)}
    return resign(out, resign_with) if resign_with is not None else out


def replace_file(files: Mapping[str, bytes], filename: str, data: bytes, *, key: Any) -> dict[str, bytes]:
    """Swap one listed file's bytes, fix its sha256/size in the manifest and re-sign with ``key``."""

    def change(raw: dict) -> None:
        raw["files"][filename] = {"sha256": sha256_bytes(data), "size": len(data)}

    return edit_manifest({**files, filename: data}, change, resign_with=key)
