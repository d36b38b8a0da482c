"""Mask encodings of the node service's answers: greyscale PNG and per-class run lengths."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


# -- mask encodings -------------------------------------------------------------------------------
def encode_png(mask: np.ndarray) -> str:
    """uint8 (H, W) class indices → base64 of a greyscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img, dtype=np.uint8).copy()


def encode_rle(mask: np.ndarray, classes: list[str]) -> dict[str, list[list[int]]]:
    """Runs ``[start, length]`` per class over the row-major flattened mask (every class listed)."""
    flat = np.asarray(mask).ravel()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1]) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    out: dict[str, list[list[int]]] = {name: [] for name in classes}
    for value, start, length in zip(values.tolist(), starts.tolist(), lengths.tolist()):
        out[classes[value]].append([start, length])
    return out


def decode_rle(rle: dict[str, list[list[int]]], classes: list[str], height: int, width: int) -> np.ndarray:
    flat = np.zeros(height * width, dtype=np.uint8)
    for value, name in enumerate(classes):
        for start, length in rle.get(name, []):
            flat[start : start + length] = value
    return flat.reshape(height, width)
