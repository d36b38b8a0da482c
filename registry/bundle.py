"""The adapter bundle (DESIGN §3): write, sign, read and verify.

Torch-free on purpose: the registry server verifies every upload with exactly this code, and
nodes verify again before loading. Verification is split into a report-returning
:func:`check_bundle` and its raising twin :func:`verify_bundle`; each failure names the file or
field at fault and has its own error class and code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semla.registry import keys as _keys
from semla.registry.fs import atomic_replace_dir
from semla.registry.privacy import check_min_samples
from semla.schemas import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    JsonLimits,
    Manifest,
    canonical_json,
    signing_payload,
    strict_json_loads,
)
from semla.schemas.errors import (
    FileSetError,
    HashMismatchError,
    InvalidInputError,
    ManifestError,
    SignatureError,
    TensorFormatError,
    UnknownKeyError,
    VerificationError,
)

__all__ = [
    "BundleReport",
    "LoraTensorInfo",
    "check_bundle",
    "verify_bundle",
    "read_bundle",
    "write_bundle",
    "sign_bundle",
    "parse_safetensors_header",
    "read_safetensors_header",
    "lora_tensor_layout",
    "lora_tensor_name",
    "sha256_bytes",
]

#: Largest bundle file accepted anywhere (weights of ViT-B-16 rank 64 are ~40 MB).
MAX_FILE_BYTES = 512 * 1024 * 1024
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
#: A safetensors header lists ~150 bytes per tensor (ViT-L/14 with every target: ~300 tensors).
HEADER_JSON_LIMITS = JsonLimits(max_bytes=1024 * 1024, max_depth=4, max_containers=20_000, max_number_chars=20)
#: adapter_config.json is a flat peft LoraConfig of a few hundred bytes.
CONFIG_JSON_LIMITS = JsonLimits(max_bytes=256 * 1024, max_depth=8, max_containers=2_000)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- safetensors ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoraTensorInfo:
    """Shapes of one LoRA-targeted module as stored in a bundle."""

    module: str
    rank: int
    in_features: int
    out_features: int
    dtype: str


def read_safetensors_header(data: bytes) -> tuple[dict[str, Any], Any, int]:
    """Read a safetensors file's framing: length prefix and a bounded, strict JSON object.

    Nothing about the tensors is checked here (:func:`parse_safetensors_header` does that); the
    audit lists what it finds after this much.

    Returns:
        (tensor entries, the raw ``__metadata__`` value or ``{}``, the header's length in bytes).

    Raises:
        TensorFormatError: too short, a bad length, over the size limits, not strict JSON, or not an object.
    """
    what = ADAPTER_WEIGHTS_FILE
    if len(data) < 8:
        raise TensorFormatError(f"{what} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > len(data) - 8:
        raise TensorFormatError(f"{what} is not a safetensors file (bad header length)")
    if n > HEADER_JSON_LIMITS.max_bytes:
        raise TensorFormatError(f"{what} header is {n} bytes; the limit is {HEADER_JSON_LIMITS.max_bytes}",
                                code="json_too_large")
    try:
        header = strict_json_loads(data[8 : 8 + n], what=f"{what} header", limits=HEADER_JSON_LIMITS)
    except ManifestError as exc:
        code = exc.code if exc.code.startswith("json_") else None  # a limit keeps its own code
        raise TensorFormatError(f"{what} is not a safetensors file ({exc.message})", code=code) from None
    if not isinstance(header, dict):
        raise TensorFormatError(f"{what} header is not a JSON object")
    meta = header.pop("__metadata__", {})
    return header, meta, n


def parse_safetensors_header(data: bytes) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors file's header without touching pickle or torch.

    Checks the declared header length, strict JSON, allowed dtypes, that byte offsets match
    the shapes and tile the data section exactly, and that every value is finite.

    Returns:
        tensor name → {"dtype", "shape", "data_offsets"}.

    Raises:
        TensorFormatError: anything about the file is not a clean safetensors file.
    """
    what = ADAPTER_WEIGHTS_FILE
    header, meta, n = read_safetensors_header(data)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise TensorFormatError(f"{what} __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n :]
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TensorFormatError(f"{what}: tensor {name!r} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise TensorFormatError(f"{what}: tensor {name!r} has dtype {dtype!r}; allowed {sorted(_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and 0 <= d <= 2**40 for d in shape)):
            raise TensorFormatError(f"{what}: tensor {name!r} has a bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and 0 <= o <= 2**62 for o in offsets)):
            raise TensorFormatError(f"{what}: tensor {name!r} has bad data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise TensorFormatError(f"{what}: tensor {name!r} offsets do not match its shape")
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise TensorFormatError(f"{what}: tensor {name!r} overlaps or leaves a gap")
        cursor = end
    if cursor != len(body):
        raise TensorFormatError(f"{what}: {len(body) - cursor} trailing bytes after the tensors")
    for begin, end, name in spans:
        dtype = header[name]["dtype"]
        raw = body[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2")
            finite = not np.any((bits & 0x7F80) == 0x7F80)
        else:
            finite = bool(np.isfinite(np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))).all())
        if not finite:
            raise TensorFormatError(f"{what}: tensor {name!r} holds NaN or Inf")
    return header


def lora_tensor_name(name: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` for a peft LoRA weight name, else None."""
    match = _LORA_KEY.match(name)
    return None if match is None else (match["module"], match["ab"])


def lora_tensor_layout(header: Mapping[str, Mapping[str, Any]]) -> dict[str, LoraTensorInfo]:
    """Group peft-named LoRA tensors by module and check each A/B pair fits together.

    Raises:
        TensorFormatError: a tensor that is not a LoRA A/B weight, a half pair, bad ranks.
    """
    pairs: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, info in header.items():
        parsed = lora_tensor_name(name)
        if parsed is None:
            raise TensorFormatError(f"{ADAPTER_WEIGHTS_FILE}: unexpected tensor {name!r}")
        pairs.setdefault(parsed[0], {})[parsed[1]] = info
    layout = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise TensorFormatError(f"{ADAPTER_WEIGHTS_FILE}: module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if len(a["shape"]) != 2 or len(b["shape"]) != 2 or a["shape"][0] != b["shape"][1]:
            raise TensorFormatError(f"{ADAPTER_WEIGHTS_FILE}: module {module!r} has mismatched A/B shapes")
        if a["dtype"] != b["dtype"]:
            raise TensorFormatError(f"{ADAPTER_WEIGHTS_FILE}: module {module!r} mixes dtypes")
        layout[module] = LoraTensorInfo(module, a["shape"][0], a["shape"][1], b["shape"][0], a["dtype"])
    return layout


# -- verification ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BundleReport:
    """Outcome of :func:`check_bundle`: the verified manifest, or the first failure."""

    manifest: Manifest | None
    error: VerificationError | None
    layout: dict[str, LoraTensorInfo] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def _check_file_set(files: Mapping[str, bytes]) -> None:
    missing = [f for f in BUNDLE_FILES if f not in files]
    extra = sorted(f for f in files if f not in BUNDLE_FILES)
    if missing:
        raise FileSetError(f"bundle is missing {', '.join(missing)}", code="missing_file")
    if extra:
        raise FileSetError(f"bundle has unexpected file(s) {', '.join(extra)}", code="extra_file")
    for name in BUNDLE_FILES:
        if len(files[name]) > MAX_FILE_BYTES:
            raise FileSetError(f"{name} is larger than {MAX_FILE_BYTES} bytes", code="file_too_large")


def _check_adapter_config(data: bytes, manifest: Manifest) -> None:
    try:
        config = strict_json_loads(data, what=ADAPTER_CONFIG_FILE, limits=CONFIG_JSON_LIMITS)
    except ManifestError as exc:
        code = exc.code if exc.code.startswith("json_") else "adapter_config_invalid"
        raise ManifestError(exc.message, code=code) from None
    if not isinstance(config, dict):
        raise ManifestError(f"{ADAPTER_CONFIG_FILE} must hold a JSON object", code="adapter_config_invalid")
    expect = {"peft_type": "LORA", "r": manifest.rank, "lora_alpha": manifest.alpha}
    for key, value in expect.items():
        if config.get(key) != value:
            raise ManifestError(
                f"{ADAPTER_CONFIG_FILE}: {key} is {config.get(key)!r}, manifest says {value!r}",
                code="adapter_config_invalid",
            )
    targets = config.get("target_modules")
    if not isinstance(targets, list) or sorted(targets) != sorted(manifest.target_modules):
        raise ManifestError(
            f"{ADAPTER_CONFIG_FILE}: target_modules differ from the manifest", code="adapter_config_invalid"
        )


def check_bundle(
    files: Mapping[str, bytes],
    trusted_keys: Mapping[str, bytes],
) -> BundleReport:
    """Verify a bundle given as file name → bytes.

    In order: the exact file set; the manifest schema and its canonical bytes; the Ed25519 signature by a trusted key
    (``trusted_keys`` maps key id → raw public key); each file's sha256 and size; the adapter
    config against the manifest; the safetensors header, LoRA layout (modules = target modules,
    rank = manifest rank) and finite values.
    """
    manifest: Manifest | None = None
    try:
        _check_file_set(files)
        manifest = Manifest.parse(files[MANIFEST_FILE])
        if files[MANIFEST_FILE] != manifest.to_canonical():
            # The signature covers the canonical encoding; accepting other bytes would let two
            # different manifest.json files (and manifest hashes) carry one signature.
            raise ManifestError(
                f"{MANIFEST_FILE} is not in canonical JSON form (sorted keys, no whitespace)",
                code="manifest_not_canonical",
            )
        if not manifest.publisher:
            raise SignatureError("manifest has no publisher: the bundle was never signed", code="unsigned")
        public = trusted_keys.get(manifest.publisher)
        if public is None:
            raise UnknownKeyError(f"publisher key {manifest.publisher} is not registered or not active")
        _keys.verify(public, files[SIGNATURE_FILE], signing_payload(manifest), what="the manifest")
        for name, entry in manifest.files.items():
            data = files[name]
            if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
                raise HashMismatchError(f"{name} does not match the sha256/size in the manifest")
        _check_adapter_config(files[ADAPTER_CONFIG_FILE], manifest)
        layout = lora_tensor_layout(parse_safetensors_header(files[ADAPTER_WEIGHTS_FILE]))
        if sorted(layout) != sorted(manifest.target_modules):
            raise TensorFormatError(f"{ADAPTER_WEIGHTS_FILE}: LoRA modules differ from the manifest's target_modules")
        for info in layout.values():
            if info.rank != manifest.rank:
                raise TensorFormatError(
                    f"{ADAPTER_WEIGHTS_FILE}: module {info.module!r} has rank {info.rank}, manifest says {manifest.rank}"
                )
    except VerificationError as exc:
        return BundleReport(manifest=manifest, error=exc)
    return BundleReport(manifest=manifest, error=None, layout=layout)


def verify_bundle(files: Mapping[str, bytes], trusted_keys: Mapping[str, bytes]) -> Manifest:
    """Raising twin of :func:`check_bundle`; returns the verified manifest."""
    report = check_bundle(files, trusted_keys)
    if report.error is not None:
        raise report.error
    assert report.manifest is not None
    return report.manifest


# -- files on disk --------------------------------------------------------------------------------
def read_bundle(path: Path) -> dict[str, bytes]:
    """Read every regular file of a bundle directory (extra files included, so they are caught).

    Raises:
        InvalidInputError: ``path`` is not a directory, or holds a sub-directory or link.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"{path} is not a bundle directory")
    files = {}
    for entry in sorted(path.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            raise FileSetError(f"bundle entry {entry.name} is not a regular file", code="extra_file")
        if entry.stat().st_size > MAX_FILE_BYTES:
            raise FileSetError(f"{entry.name} is larger than {MAX_FILE_BYTES} bytes", code="file_too_large")
        files[entry.name] = entry.read_bytes()
    return files


def write_bundle(
    out: Path,
    *,
    weights: bytes,
    adapter_config: Mapping[str, Any],
    manifest_fields: Mapping[str, Any],
) -> Manifest:
    """Write an unsigned bundle atomically and return its manifest.

    ``manifest_fields`` holds every manifest field except ``files`` (computed here) and
    ``publisher`` (set when the bundle is signed).

    Raises:
        InvalidInputError: ``out`` exists, or the fields do not form a valid manifest.
    """
    if Path(out).exists():
        raise InvalidInputError(f"{out} already exists")
    config_bytes = json.dumps(dict(adapter_config), indent=2, sort_keys=True).encode() + b"\n"
    file_entries = {
        ADAPTER_WEIGHTS_FILE: {"sha256": sha256_bytes(weights), "size": len(weights)},
        ADAPTER_CONFIG_FILE: {"sha256": sha256_bytes(config_bytes), "size": len(config_bytes)},
    }
    fields = {**manifest_fields, "publisher": "", "files": file_entries}
    try:
        manifest = Manifest.parse(canonical_json(fields))
    except ManifestError as exc:
        raise InvalidInputError(f"cannot build manifest: {exc.message}") from None
    atomic_replace_dir(
        out,
        {ADAPTER_WEIGHTS_FILE: weights, ADAPTER_CONFIG_FILE: config_bytes, MANIFEST_FILE: manifest.to_canonical()},
    )
    return manifest


def sign_bundle(path: Path, key: Any, *, version: int | None = None, min_samples: int | None = None) -> Manifest:
    """Sign a bundle in place: set publisher (and optionally version), write manifest.sig.

    The manifest and signature are replaced together, atomically.

    Args:
        min_samples: refuse a centroid of fewer samples than this (on top of the manifest's own
            ``privacy.min_samples``, which the schema enforces anyway).

    Raises:
        InvalidInputError: not a bundle directory.
        VerificationError: the bundle's files do not match its manifest (nothing is signed).
        TooFewSamplesError: ``sample_count`` is below ``min_samples`` (nothing is signed).
    """
    path = Path(path)
    files = read_bundle(path)
    files.pop(SIGNATURE_FILE, None)
    if MANIFEST_FILE not in files:
        raise FileSetError(f"{path} has no {MANIFEST_FILE}", code="missing_file")
    manifest = Manifest.parse(files[MANIFEST_FILE])
    if min_samples is not None:
        check_min_samples(manifest.sample_count, min_samples, what=f"the centroid of {path}")
    for name, entry in manifest.files.items():
        data = files.get(name)
        if data is None:
            raise FileSetError(f"bundle is missing {name}", code="missing_file")
        if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
            raise HashMismatchError(f"{name} does not match the sha256/size in the manifest; refusing to sign")
    update: dict[str, Any] = {"publisher": _keys.key_id(key)}
    if version is not None:
        update["version"] = version
    manifest = Manifest.parse(canonical_json({**manifest.model_dump(mode="json"), **update}))
    files[MANIFEST_FILE] = manifest.to_canonical()
    files[SIGNATURE_FILE] = _keys.sign(key, signing_payload(manifest))
    atomic_replace_dir(path, files, overwrite=True)
    return manifest

