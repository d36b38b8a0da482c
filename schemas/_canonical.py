"""Canonical JSON: the one byte string that is ever signed or hashed (after TUF)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from semla.schemas.errors import InvalidInputError, ManifestError

__all__ = ["JsonLimits", "DEFAULT_JSON_LIMITS", "canonical_json", "check_json_limits", "strict_json_loads"]


def _check_finite(obj: Any) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InvalidInputError("canonical JSON cannot hold NaN or Infinity")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InvalidInputError(f"canonical JSON keys must be strings, got {type(k).__name__}")
            _check_finite(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_finite(v)


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON bytes.

    Sorted keys, no insignificant whitespace, UTF-8 (no ASCII escaping), no NaN/Infinity.
    Floats use Python's shortest round-trip repr, so ``canonical_json(loads(canonical_json(x)))``
    is byte-identical.

    Raises:
        ValueError: ``obj`` holds NaN/Infinity, non-string keys or non-JSON types.
    """
    _check_finite(obj)
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ManifestError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class JsonLimits:
    """Bounds checked on a JSON document's bytes before it is parsed.

    Python's ``json`` recurses per nesting level (a RecursionError deep down), builds one object
    per value (a 32 MiB ``[{},{},...]`` costs about 800 MB) and turns any digit string into an
    int. Checking the bytes first keeps the parse's memory within a small multiple of
    ``max_bytes`` plus ``max_containers`` objects.

    Attributes:
        max_bytes: the document's size.
        max_depth: nesting of arrays and objects.
        max_containers: arrays and objects in the whole document.
        max_number_chars: characters of one number (a float's repr needs at most 24).
    """

    max_bytes: int = 2 * 1024 * 1024
    max_depth: int = 32
    max_containers: int = 20_000
    max_number_chars: int = 40


DEFAULT_JSON_LIMITS = JsonLimits()

#: A JSON string (quotes included), escapes skipped; the unrolled form runs without backtracking.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NUMBER = re.compile(rb"[-+0-9.eE]+")
#: ``bytes.translate`` table: each number character to ``0``, every other byte to a space (a
#: number too long is then a run of zeros, found by a substring search in C).
_NUMBER_RUNS = bytes(ord("0") if chr(b) in "-+0123456789.eE" else ord(" ") for b in range(256))
_CHUNK = 1 << 20
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def check_json_limits(data: bytes, limits: JsonLimits = DEFAULT_JSON_LIMITS, *, what: str = "JSON document") -> None:
    """Refuse a document whose size, nesting, container count or number length exceeds ``limits``.

    Runs on the raw bytes (strings blanked out, brackets counted; their nesting in numpy, chunk
    by chunk, only when there are more of them than ``max_depth``), so its cost is linear and
    its memory a few MiB whatever the document holds.

    Raises:
        ManifestError: ``json_too_large``, ``json_too_deep``, ``json_too_many_values`` or
            ``json_number_too_long``.
    """
    if len(data) > limits.max_bytes:
        raise ManifestError(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes}", code="json_too_large")
    bare = _STRING.sub(b'""', data)
    containers = bare.count(b"[") + bare.count(b"{")
    if containers > limits.max_depth:  # fewer containers than that cannot nest deeper
        depth = 0
        for start in range(0, len(bare), _CHUNK):
            chunk = np.frombuffer(bare, dtype=np.uint8, count=min(_CHUNK, len(bare) - start), offset=start)
            levels = depth + np.cumsum(_STEP[chunk], dtype=np.int32)
            if len(levels) and int(levels.max()) > limits.max_depth:
                raise ManifestError(f"{what} nests deeper than {limits.max_depth} levels", code="json_too_deep")
            depth = int(levels[-1]) if len(levels) else depth
    if containers > limits.max_containers:
        raise ManifestError(f"{what} holds {containers} arrays/objects; the limit is {limits.max_containers}",
                            code="json_too_many_values")
    if b"0" * (limits.max_number_chars + 1) in bare.translate(_NUMBER_RUNS):
        longest = max(len(m) for m in _NUMBER.findall(bare))
        raise ManifestError(f"{what} holds a number of {longest} characters; the limit is "
                            f"{limits.max_number_chars}", code="json_number_too_long")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ManifestError(f"number {text[:40]} is out of range")
    return value


def strict_json_loads(data: bytes | str, *, what: str = "JSON document",
                      limits: JsonLimits = DEFAULT_JSON_LIMITS) -> Any:
    """Parse JSON within ``limits``, refusing duplicate keys, NaN/Infinity (also as an
    overflowing literal such as ``1e999``) and invalid UTF-8.

    Raises:
        ManifestError: the bytes exceed the limits (with the code of
            :func:`check_json_limits`) or are not strict JSON.
    """
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else bytes(data)
    check_json_limits(raw, limits, what=what)
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except ManifestError as exc:
        raise ManifestError(f"{what}: {exc.message}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid UTF-8 JSON: {exc}") from None
