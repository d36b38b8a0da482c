"""The answer's schema (pydantic models) and the request body's OpenAPI description."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from semla.registry.retrieval import (
    DISTANCES,
)
from semla.schemas.api import MAX_TEMPERATURE, MIN_TEMPERATURE, Contribution
from semla.registry.serve.codecs import encode_png, encode_rle
from semla.registry.serve.settings import FORMATS, MAX_TOP_K
from semla.registry.serve.worker import Done
from semla.registry.weighting import MAX_GUARD_Z, list_weightings


# -- response schema ------------------------------------------------------------------------------
class Timings(BaseModel):
    queue: float
    compute: float
    batch_size: int


class SegmentResult(BaseModel):
    image: str
    classes: list[str]
    width: int
    height: int
    mask_png: str | None = None
    rle: dict[str, list[list[int]]] | None = None
    contributions: list[Contribution]
    base_weight: float = 0.0
    timings_ms: Timings


class SegmentResponse(BaseModel):
    results: list[SegmentResult]


def result_json(filename: str, done: Done, fmt: str) -> dict[str, Any]:
    pred = done.prediction
    height, width = pred.mask.shape
    out: dict[str, Any] = {"image": filename, "classes": pred.classes, "width": width, "height": height}
    if fmt == "png":
        out["mask_png"] = encode_png(pred.mask)
    else:
        out["rle"] = encode_rle(pred.mask, pred.classes)
    out["contributions"] = [c.model_dump() for c in pred.contributions]
    out["base_weight"] = round(pred.base_weight, 6)
    out["timings_ms"] = {"queue": round(done.queue_ms, 3), "compute": round(done.compute_ms, 3),
                         "batch_size": done.batch_size}
    return out


SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "one or more images and the vocabulary to segment them with",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images", "classes"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "description": "image files (PNG, JPEG, ...); repeat the part for several"},
                        "classes": {"type": "string", "example": "sky,road,sidewalk,building,vegetation,car",
                                    "description": "comma-separated class names (any vocabulary)"},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                                  "description": "adapters fused per image (capped at the library size)"},
                        "temperature": {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE,
                                        "description": "softmax temperature of the weighting (default: the "
                                                       "scheme's own)"},
                        "distance": {"type": "string", "enum": list(DISTANCES)},
                        "weighting": {"type": "string", "enum": list_weightings(),
                                      "description": "fusion weighting scheme (default calibrated)"},
                        "guard": {"type": "boolean",
                                  "description": "give the base model weight when an image lies outside the "
                                                 "library; base_weight in each result"},
                        "guard_z": {"type": "number", "minimum": 0, "maximum": MAX_GUARD_Z,
                                    "description": "the base's position in spread units (default: the library's)"},
                        "format": {"type": "string", "enum": list(FORMATS), "default": "png",
                                   "description": "png: base64 greyscale PNG of class indices; "
                                                  "rle: {class: [[start, length], ...]} over the row-major mask"},
                    },
                }
            }
        },
    }
}
