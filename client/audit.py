"""``semla-client audit BUNDLE``: every byte a publish would send, and whatever should not be there.

An upload sends the bundle's files as they are, one multipart/form-data part each, and nothing
else. The audit lists exactly those bytes: every file with its size and sha256, every tensor
(name, dtype, shape) and the safetensors header metadata, every field of adapter_config.json
and of the manifest, the centroid count, the sample count and the privacy block.
``semla-client publish --dry-run`` prints the same listing (one implementation: this module).

It then flags what should not leave the owner's machine. A flag names its code, the file and
the place in it:

===================== =======================================================================
``absolute_path``     a string that looks like an absolute or home-relative file path
``user_name``         this machine's user name ($USER, $LOGNAME, the login, the home folder)
``home_dir``          this machine's home directory
``host_name``         this machine's host name (``socket.gethostname()``)
``image_data``        image bytes or an EXIF block (PNG, JPEG, GIF, TIFF, WebP signatures), raw,
                      base64-encoded or in a data: URI, anywhere in any file
``base64_blob``       a long base64 run (it can hide anything)
``non_lora_tensor``   a tensor that is not a peft LoRA A/B weight, or half of an A/B pair
``unexpected_metadata`` safetensors ``__metadata__`` beyond ``format``
``extra_file``        a file that is not part of a bundle (a publish would send it too)
``missing_file``      weights, adapter config or manifest missing
``unreadable``        a JSON or safetensors file that does not parse (it cannot be listed)
``too_few_samples``   sample_count below the minimum (default 50; ``--min-samples``)
``single_image``      sample_count below 2: the centroid is one image's embedding
``small_cluster``     k > 1 centroids over fewer than k x minimum samples: at least one
                      centroid summarises fewer images than the minimum
``dp_with_kmeans``    DP recorded on k > 1 centroids (the Gaussian release covers a mean only)
===================== =======================================================================

Exit codes of the command: 0 nothing flagged, 3 something flagged (the listing is printed
either way), 1 or 2 as every command (cannot read the bundle, bad arguments).

The scan is heuristic: a flag is something to look at, and a clean audit is no proof that a
value is harmless (a domain description can still name a person). The signature file is
listed but not required: an unsigned bundle can be audited before it is signed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import getpass
import json
import os
import re
import socket
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from semla.registry.bundle import lora_tensor_name, read_bundle, sha256_bytes
from semla.registry.privacy import DEFAULT_MIN_SAMPLES
from semla.schemas import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
)

__all__ = [
    "EXIT_FLAGGED",
    "AuditReport",
    "AuditedFile",
    "AuditedTensor",
    "Flag",
    "Identity",
    "add_parser",
    "audit_bundle",
    "audit_files",
    "describe_payload",
    "local_identity",
]

#: Exit code of ``semla-client audit`` (and ``publish --dry-run``) when something is flagged.
EXIT_FLAGGED = 3
#: Shortest base64 run reported as a blob (a sha256 in hex is 64 characters; 120 base64
#: characters = 90 bytes). Shorter runs are still decoded and flagged when they hold an image.
MIN_BASE64_RUN = 120
#: Identity strings shorter than this are not searched for (too many chance hits).
MIN_NEEDLE = 3

#: (kind, a fixed prefix found with bytes.find, a pattern confirming it or None). Long enough
#: that float tensor data does not produce them by chance.
_IMAGE_SIGNATURES = (
    ("png", b"\x89PNG\r\n\x1a\n", None),
    ("jpeg", b"\xff\xd8\xff", re.compile(rb"\xff\xd8\xff[\xe0-\xef]..(?:JFIF|JFXX|Exif)", re.DOTALL)),
    ("gif", b"GIF8", re.compile(rb"GIF8[79]a")),
    ("tiff", b"II*\x00\x08\x00\x00\x00", None),
    ("tiff", b"MM\x00*\x00\x00\x00\x08", None),
    ("webp", b"RIFF", re.compile(rb"RIFF....WEBPVP8", re.DOTALL)),
    ("exif", b"Exif\x00\x00", None),
)
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")
_DATA_URI = re.compile(r"data:[a-z]+/[a-z0-9.+-]+;base64,", re.IGNORECASE)
#: Absolute POSIX paths of two or more components, ~/..., C:\..., \\server\..., file:// URLs.
_PATH = re.compile(
    r"(?<![\w:/.\\])/[^\s/\"'<>|]+/[^\s\"'<>|]*"
    r"|(?<![\w])~[/\\]"
    r"|(?<![\w])[A-Za-z]:[\\/][^\s\"']*"
    r"|\\\\[A-Za-z0-9]"
    r"|file://"
)


# -- who and where am I ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Identity:
    """Strings that name this machine or its user, searched for in every file."""

    users: tuple[str, ...] = ()
    homes: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()


def _usable(values: Any) -> tuple[str, ...]:
    out = {v for v in values if v and len(v) >= MIN_NEEDLE and v.lower() not in ("localhost", "/")}
    return tuple(sorted(out))


def local_identity() -> Identity:
    """The current user's names, home directory and host name (strings shorter than 3 are skipped)."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid
        login = None
    home = Path.home()
    host = socket.gethostname()
    return Identity(
        users=_usable([login, os.environ.get("USER"), os.environ.get("LOGNAME"), home.name]),
        homes=_usable([str(home), os.environ.get("HOME")]),
        hosts=_usable([host, host.split(".")[0]]),
    )


# -- the report -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flag:
    """Something that should not leave the machine: ``code``, the file and place, a sentence."""

    code: str
    where: str
    message: str


@dataclasses.dataclass(frozen=True)
class AuditedFile:
    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class AuditedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    lora: bool


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What an upload of a bundle would send, and the flags raised on it.

    ``adapter_config`` and ``manifest`` are the files' JSON exactly as parsed (None when a file
    is missing or not JSON); ``metadata`` is the safetensors ``__metadata__``.
    """

    files: tuple[AuditedFile, ...]
    tensors: tuple[AuditedTensor, ...]
    metadata: dict[str, Any]
    adapter_config: Any
    manifest: Any
    summary: dict[str, Any]
    flags: tuple[Flag, ...]

    @property
    def ok(self) -> bool:
        """True when nothing was flagged."""
        return not self.flags

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready data (``semla-client audit --json``)."""
        return {
            "files": [dataclasses.asdict(f) for f in self.files],
            "total_bytes": self.total_bytes,
            "tensors": [{**dataclasses.asdict(t), "shape": list(t.shape)} for t in self.tensors],
            "safetensors_metadata": self.metadata,
            "adapter_config": self.adapter_config,
            "manifest": self.manifest,
            "summary": self.summary,
            "flags": [dataclasses.asdict(f) for f in self.flags],
            "ok": self.ok,
        }

    def lines(self) -> list[str]:
        """The human-readable listing (``semla-client audit`` and ``publish --dry-run``)."""
        out = [f"{len(self.files)} files, {self.total_bytes} bytes in total, each sent as is as one "
               "multipart/form-data part:"]
        width = max((len(f.name) for f in self.files), default=0)
        out += [f"  {f.name:<{width}}  {f.size:>10} bytes  sha256 {f.sha256}" for f in self.files]
        if all(f.name != SIGNATURE_FILE for f in self.files):
            out.append(f"  ({SIGNATURE_FILE} not written yet: signing adds its 64 bytes, an Ed25519 signature)")
        lora = sum(t.lora for t in self.tensors)
        meta = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(self.metadata.items()))
        out.append(f"{ADAPTER_WEIGHTS_FILE}: {len(self.tensors)} tensors ({lora} LoRA A/B), "
                   f"header metadata: {meta or 'none'}")
        out += [f"  {t.name} {t.dtype} {list(t.shape)}" for t in self.tensors]
        for name, data in ((ADAPTER_CONFIG_FILE, self.adapter_config), (MANIFEST_FILE, self.manifest)):
            if data is not None:
                out.append(f"{name} fields:")
                out += [f"  {k} = {v}" for k, v in _flatten("", data)]
        s = self.summary
        if s:
            out.append(f"summary: {s['centroids']} centroid(s) of {s['dimension']} floats from {s['sample_count']} "
                       f"samples (minimum {s['min_samples']}); privacy: {_privacy_text(s['privacy'])}")
            if s.get("update_privacy") is not None:
                out.append(f"  federated LoRA updates: {_privacy_text(s['update_privacy'])}")
            out.append(_spread_text(s.get("schema_version"), s.get("spread")))
        if self.ok:
            out.append("flags: none (nothing found that should not leave this machine)")
        else:
            out.append(f"flags ({len(self.flags)}): this payload carries something that should not leave this machine:")
            out += [f"  FLAG {f.code}: {f.where}: {f.message}" for f in self.flags]
        return out


def _spread_text(schema_version: Any, spread: Mapping[str, Any] | None) -> str:
    if spread is None:
        return (f"spread: none (manifest schema {schema_version}; nodes use the library's default spread for "
                "this adapter)")
    noise = ("" if spread.get("mechanism") == "none" else
             f"; {spread['mechanism']} DP, epsilon {spread['epsilon']:g} of the privacy budget, {spread['bins']} bins")
    return (f"spread: distances of the training embeddings to their nearest centroid q50={spread['q50']:.4f} "
            f"q90={spread['q90']:.4f} q99={spread['q99']:.4f} over {spread['count']} samples{noise}")


def _privacy_text(block: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in block.items() if v is not None) or "none"


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
    """(dotted path, JSON text) of every leaf; centroid vectors summarised (aggregates, not images)."""
    if isinstance(value, dict) and value:
        for k in sorted(value):
            yield from _flatten(f"{prefix}.{k}" if prefix else k, value[k])
    elif prefix == "centroids.vectors" and isinstance(value, list) and value and isinstance(value[0], list):
        yield prefix, f"{len(value)} unit vector(s) x {len(value[0])} floats (aggregate, not per image)"
    else:
        yield prefix, json.dumps(value, ensure_ascii=False)


# -- scanning -------------------------------------------------------------------------------------
class _Flags:
    """Collects flags, each (code, file, matched text) once, the first (most precise) place kept."""

    def __init__(self) -> None:
        self.items: list[Flag] = []
        self._seen: set[tuple[str, str, str]] = set()

    def add(self, code: str, file: str, place: str, message: str, match: str = "") -> None:
        key = (code, file, match)
        if key in self._seen:
            return
        self._seen.add(key)
        self.items.append(Flag(code, f"{file} {place}".strip(), message))


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _images(data: bytes) -> dict[str, int]:
    """Image signature kind → offset of its first occurrence in ``data``."""
    found: dict[str, int] = {}
    for kind, prefix, confirm in _IMAGE_SIGNATURES:
        at = data.find(prefix)
        while at != -1 and confirm is not None and not confirm.match(data, at):
            at = data.find(prefix, at + 1)
        if at != -1:
            found[kind] = min(at, found.get(kind, at))
    return found


def _scan_base64(flags: _Flags, file: str, place: str, data: bytes) -> None:
    for match in _BASE64_RUN.finditer(data):
        run = match.group()
        try:
            decoded = base64.b64decode(run + b"=" * (-len(run) % 4))
        except (binascii.Error, ValueError):
            decoded = b""
        kinds = _images(decoded)
        head = run[:16].decode("ascii")
        if kinds:
            flags.add("image_data", file, place, f"base64 run {head}... decodes to {', '.join(sorted(kinds))} "
                      "image data", head)
        elif len(run) >= MIN_BASE64_RUN:
            flags.add("base64_blob", file, place, f"a base64 run of {len(run)} characters ({head}...)", head)


def _has_word(lowered: bytes, word: str) -> bool:
    """Whether ``word`` occurs in ``lowered`` (lower-cased bytes) not inside a longer word."""
    needle = word.lower().encode()
    at = lowered.find(needle)
    while at != -1:
        end = at + len(needle)
        if (at == 0 or lowered[at - 1] not in _WORD_BYTES) and (end == len(lowered) or lowered[end] not in _WORD_BYTES):
            return True
        at = lowered.find(needle, at + 1)
    return False


def _scan_identity(flags: _Flags, file: str, place: str, data: bytes, identity: Identity) -> None:
    lowered = data.lower()
    for code, values in (("home_dir", identity.homes), ("user_name", identity.users), ("host_name", identity.hosts)):
        for value in values:
            if _has_word(lowered, value):
                what = {"home_dir": "home directory", "user_name": "user name", "host_name": "host name"}[code]
                flags.add(code, file, place, f"this machine's {what} {value!r}", value.lower())


def _scan_bytes(flags: _Flags, file: str, data: bytes, identity: Identity) -> None:
    """Raw bytes of a whole file: image signatures, base64 runs, identity strings."""
    for kind, offset in sorted(_images(data).items()):
        flags.add("image_data", file, f"@{offset}", f"{kind.upper()} signature at byte {offset}", kind)
    _scan_base64(flags, file, "", data)
    if file == ADAPTER_WEIGHTS_FILE and len(data) >= 8:
        # names and paths can only hide in the header: short names (3 letters) occur by chance
        # as bytes of float tensors, so the tensor data is searched for image signatures only
        data = data[: 8 + int.from_bytes(data[:8], "little")]
    _scan_identity(flags, file, "", data, identity)


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(place, string) for every key and string value of parsed JSON."""
    if isinstance(value, str):
        yield path or "(value)", value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}" if path else k, k
            yield from _strings(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _scan_strings(flags: _Flags, file: str, value: Any, identity: Identity) -> None:
    """Every string of parsed JSON: paths, data: URIs, base64, image bytes, identity strings."""
    for place, text in _strings(value):
        raw = text.encode("utf-8")
        path = _PATH.search(text)
        if path:
            flags.add("absolute_path", file, place, f"a file path {_clip(path.group())!r}", path.group())
        if _DATA_URI.search(text):
            flags.add("image_data" if "image/" in text.lower() else "base64_blob", file, place,
                      f"a data: URI {_clip(text, 40)!r}", _DATA_URI.search(text).group().lower())
        for kind in _images(text.encode("latin-1", errors="replace")):
            flags.add("image_data", file, place, f"{kind.upper()} signature in a string", kind)
        _scan_base64(flags, file, place, raw)
        _scan_identity(flags, file, place, raw, identity)


def _json(flags: _Flags, name: str, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        flags.add("unreadable", name, "", f"not UTF-8 JSON ({exc}); its bytes cannot be listed field by field")
        return None


def _safetensors(flags: _Flags, data: bytes, identity: Identity) -> tuple[list[AuditedTensor], dict[str, Any]]:
    """Tensors and metadata of a safetensors header, leniently (the audit lists, never refuses)."""
    name = ADAPTER_WEIGHTS_FILE
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        flags.add("unreadable", name, "", f"not a safetensors file ({exc}); its tensors cannot be listed")
        return [], {}
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        metadata = {"(not an object)": metadata}
    for key in sorted(metadata):
        if key != "format":
            flags.add("unexpected_metadata", name, f"__metadata__.{key}",
                      f"header metadata {key}={_clip(json.dumps(metadata[key], ensure_ascii=False))}", key)
    tensors, halves = [], {}
    for tensor, info in sorted(header.items()):
        info = info if isinstance(info, dict) else {}
        parsed = lora_tensor_name(tensor)
        shape = tuple(info.get("shape") or ())
        tensors.append(AuditedTensor(tensor, str(info.get("dtype")), shape, parsed is not None and len(shape) == 2))
        if parsed is None:
            flags.add("non_lora_tensor", name, tensor, f"tensor {_clip(tensor)!r} {list(shape)} is not a LoRA A/B "
                      "weight", tensor)
        else:
            halves.setdefault(parsed[0], set()).add(parsed[1])
    for module, ab in sorted(halves.items()):
        if ab != {"A", "B"}:
            flags.add("non_lora_tensor", name, module, f"module {module!r} has lora_{''.join(sorted(ab))} only", module)
    _scan_strings(flags, name, {"__metadata__": metadata, "tensors": sorted(header)}, identity)
    return tensors, metadata


def _manifest_checks(flags: _Flags, raw: Any, min_samples: int) -> dict[str, Any]:
    """Sample-count and centroid rules on the manifest; returns the summary."""
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        flags.add("unreadable", MANIFEST_FILE, where, f"not a valid manifest: {first['msg']}")
        return {}
    k, n = len(manifest.centroids.vectors), manifest.sample_count
    floor = max(min_samples, manifest.privacy.min_samples)
    if n < floor:
        flags.add("too_few_samples", MANIFEST_FILE, "sample_count",
                  f"the centroid summarises {n} samples; at least {floor} are required")
    if n < 2:
        flags.add("single_image", MANIFEST_FILE, "sample_count", "the centroid is the embedding of a single image")
    if k > 1 and n < k * floor:
        flags.add("small_cluster", MANIFEST_FILE, "centroids.vectors",
                  f"{k} k-means centroids over {n} samples: at least one summarises fewer than {floor} images")
    if k > 1 and manifest.privacy.mechanism != "none":
        flags.add("dp_with_kmeans", MANIFEST_FILE, "privacy",
                  f"{manifest.privacy.mechanism} DP is recorded on {k} k-means centroids; it covers a single mean")
    fed = manifest.training.federated
    return {
        "centroids": k,
        "dimension": manifest.centroids.dim,
        "sample_count": n,
        "min_samples": floor,
        "privacy": manifest.privacy.model_dump(mode="json"),
        "update_privacy": fed.update_privacy.model_dump(mode="json") if fed and fed.update_privacy else None,
        "schema_version": manifest.schema_version,
        "spread": manifest.spread.model_dump(mode="json") if manifest.spread is not None else None,
    }


def audit_files(
    files: Mapping[str, bytes], *, min_samples: int = DEFAULT_MIN_SAMPLES, identity: Identity | None = None
) -> AuditReport:
    """Audit a bundle given as file name → bytes (exactly what an upload of it sends).

    Args:
        min_samples: the sample floor to flag against (the manifest's own minimum if higher).
        identity: strings naming this machine and user; default :func:`local_identity`.
    """
    identity = local_identity() if identity is None else identity
    flags = _Flags()
    for name in sorted(files):
        if name not in BUNDLE_FILES:
            flags.add("extra_file", name, "", "not a bundle file; a publish would send it too", name)
    for name in BUNDLE_FILES:
        if name not in files and name != SIGNATURE_FILE:
            flags.add("missing_file", name, "", "missing from the bundle", name)
    tensors, metadata, config, raw_manifest, summary = [], {}, None, None, {}
    if ADAPTER_WEIGHTS_FILE in files:
        tensors, metadata = _safetensors(flags, files[ADAPTER_WEIGHTS_FILE], identity)
    if ADAPTER_CONFIG_FILE in files:
        config = _json(flags, ADAPTER_CONFIG_FILE, files[ADAPTER_CONFIG_FILE])
        _scan_strings(flags, ADAPTER_CONFIG_FILE, config, identity)
    if MANIFEST_FILE in files:
        raw_manifest = _json(flags, MANIFEST_FILE, files[MANIFEST_FILE])
        _scan_strings(flags, MANIFEST_FILE, raw_manifest, identity)
        if raw_manifest is not None:
            summary = _manifest_checks(flags, raw_manifest, min_samples)
    for name in sorted(files):
        _scan_bytes(flags, name, files[name], identity)
    return AuditReport(
        files=tuple(AuditedFile(n, len(d), sha256_bytes(d)) for n, d in sorted(files.items())),
        tensors=tuple(tensors), metadata=metadata, adapter_config=config, manifest=raw_manifest,
        summary=summary, flags=tuple(flags.items),
    )


def audit_bundle(path: Path, **options: Any) -> AuditReport:
    """Audit a bundle directory: every regular file in it is what a publish would send.

    Raises:
        InvalidInputError: ``path`` is not a directory.
        FileSetError: it holds a sub-directory or a link (a publish refuses it too).
    """
    return audit_files(read_bundle(Path(path)), **options)


def describe_payload(files: Mapping[str, bytes]) -> list[str]:
    """The audit listing of ``files`` (what ``publish --dry-run`` prints)."""
    return audit_files(files).lines()


# -- command line ---------------------------------------------------------------------------------
_HELP = """\
List every byte a publish of BUNDLE would send (files with sizes and sha256, tensors with
dtypes and shapes, safetensors metadata, every adapter_config.json and manifest field, the
centroid and sample counts, the DP block) and flag what should not leave this machine:
absolute or home paths, this user's or host's name, image or EXIF data (raw or base64),
long base64 blobs, tensors that are not LoRA A/B weights, extra files, a centroid of fewer
samples than the minimum, k-means centroids too small to meet it, DP on k-means centroids.

Exit status: 0 nothing flagged, 3 something flagged, 1 or 2 the bundle could not be read.
"""


def _run(args: argparse.Namespace) -> int:
    report = audit_bundle(args.bundle, min_samples=args.min_samples)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else EXIT_FLAGGED


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` command to ``semla-client``'s sub-commands."""
    p = subparsers.add_parser("audit", help="list every byte a publish would send and flag what should not leave",
                              description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the listing and flags as JSON")
    p.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                   help=f"flag centroids of fewer samples than this (default {DEFAULT_MIN_SAMPLES})")
    p.set_defaults(func=_run)
    return p
