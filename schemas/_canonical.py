"""Canonical JSON: the one byte string that is ever signed or hashed (after TUF)."""

from __future__ import annotations

import json
import math
from typing import Any

from semla.schemas.errors import ManifestError

__all__ = ["canonical_json", "strict_json_loads"]


def _check_finite(obj: Any) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("canonical JSON cannot hold NaN or Infinity")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"canonical JSON keys must be strings, got {type(k).__name__}")
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


def strict_json_loads(data: bytes | str, *, what: str = "JSON document") -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and invalid UTF-8.

    Raises:
        ManifestError: the bytes are not strict JSON.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ManifestError as exc:
        raise ManifestError(f"{what}: {exc.message}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid UTF-8 JSON: {exc}") from None
