"""Parsing a segment request: the multipart form, its fields and images, within bounds."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from fastapi import Request
from PIL import Image, UnidentifiedImageError

from semla.registry._limits import MAX_CLASS_NAME_CHARS, MAX_CLASSES
from semla.registry.asgi import (
    BodyTimeout,
    Part,
    RequestTooLarge,
    read_multipart,
)
from semla.registry.retrieval import (
    DISTANCES,
    TEMPERATURE_RANGE,
    temperature_ok,
)
from semla.schemas.errors import InvalidInputError, UnprocessableError
from semla.registry.serve.settings import FORMATS, MAX_IMAGE_PIXELS, MAX_TOP_K, ServeSettings, guard_z_ok
from semla.registry.weighting import MAX_GUARD_Z, WEIGHTINGS, list_weightings
from semla.schemas.api import DEFAULT_WEIGHTING


# -- request parsing ------------------------------------------------------------------------------
@dataclasses.dataclass
class Form:
    images: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


_FIELDS = ("classes", "top_k", "temperature", "distance", "weighting", "guard", "guard_z", "format")


def _form_part(max_images: int):
    """``accept`` hook: repeatable ``images`` parts up to ``max_images``, each field at most once."""

    def accept(name: str, parts: list[Part]) -> None:
        if name == "images":
            if sum(p.name == "images" for p in parts) >= max_images:
                raise RequestTooLarge(f"more than {max_images} images in one request")
        elif name not in _FIELDS:
            raise UnprocessableError(f"unexpected form part {name!r}; expected images and "
                                     f"{', '.join(_FIELDS)}", code="invalid_form")
        elif any(p.name == name for p in parts):
            raise UnprocessableError(f"form field {name!r} given twice", code="invalid_form")

    return accept


async def read_form(request: Request, settings: ServeSettings) -> Form:
    """Stream the multipart body into memory, counting bytes and images against the limits."""
    try:
        parts = await read_multipart(request, max_bytes=settings.max_upload_bytes,
                                     accept=_form_part(settings.max_images))
    except InvalidInputError as exc:
        if isinstance(exc, (RequestTooLarge, UnprocessableError, BodyTimeout)):
            raise
        raise UnprocessableError(exc.message, code=exc.code) from None
    form = Form()
    for part in parts:
        if part.name == "images":
            form.images.append((part.filename or f"image-{len(form.images)}", part.data))
        else:
            form.fields[part.name] = part.data.decode("utf-8", errors="replace")
    return form


@dataclasses.dataclass(frozen=True)
class Params:
    classes: list[str]
    top_k: int
    temperature: float | None
    distance: str
    format: str
    weighting: str = DEFAULT_WEIGHTING
    guard: bool = False
    guard_z: float | None = None

    def options(self) -> tuple:
        """The retrieval options as a hashable batching key (sorted (name, value) pairs)."""
        return tuple(sorted({"top_k": self.top_k, "temperature": self.temperature, "distance": self.distance,
                             "weighting": self.weighting, "guard": self.guard, "guard_z": self.guard_z}.items()))


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_params(fields: dict[str, str], settings: ServeSettings) -> Params:
    classes = [c.strip() for c in fields.get("classes", "").split(",") if c.strip()]
    if not classes:
        raise UnprocessableError("give the class names as a comma-separated form field classes=sky,road,...",
                                 code="empty_classes")
    if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
        raise UnprocessableError(f"classes must be at most {MAX_CLASSES} distinct names", code="bad_classes")
    if max(map(len, classes)) > MAX_CLASS_NAME_CHARS:
        raise UnprocessableError(f"a class name is longer than {MAX_CLASS_NAME_CHARS} characters (CLIP reads 77 "
                                 "tokens)", code="bad_classes")
    try:
        top_k = int(fields.get("top_k") or settings.top_k)
        temperature = float(fields["temperature"]) if fields.get("temperature") else settings.temperature
        guard_z = float(fields["guard_z"]) if fields.get("guard_z") else settings.guard_z
    except ValueError:
        raise UnprocessableError("top_k must be an integer, temperature and guard_z numbers",
                                 code="bad_parameter") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise UnprocessableError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}", code="bad_parameter")
    if not temperature_ok(temperature):
        raise UnprocessableError(f"temperature must lie in {TEMPERATURE_RANGE}, got {temperature}", code="bad_parameter")
    distance = fields.get("distance") or settings.distance
    if distance not in DISTANCES:
        raise UnprocessableError(f"distance must be one of {', '.join(DISTANCES)}", code="bad_parameter")
    fmt = fields.get("format") or "png"
    if fmt not in FORMATS:
        raise UnprocessableError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", code="bad_parameter")
    weighting = fields.get("weighting") or settings.weighting
    if weighting not in WEIGHTINGS:
        raise UnprocessableError(f"unknown weighting {weighting[:64]!r}; valid: {', '.join(list_weightings())}",
                                 code="unknown_weighting")
    guard_text = (fields.get("guard") or "").strip().lower()
    if guard_text and guard_text not in _TRUE + _FALSE:
        raise UnprocessableError("guard must be true or false", code="bad_parameter")
    guard = guard_text in _TRUE if guard_text else settings.guard
    if guard_z is not None and not guard_z_ok(guard_z):
        raise UnprocessableError(f"guard_z must lie in [0, {MAX_GUARD_Z:g}], got {guard_z}", code="bad_parameter")
    return Params(classes, top_k, temperature, distance, fmt, weighting, guard, guard_z)


def decode_image(filename: str, data: bytes) -> np.ndarray:
    """Uploaded bytes → uint8 RGB (H, W, 3), refusing non-images and oversized images."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise RequestTooLarge(f"image {filename!r} is {img.width}x{img.height}; "
                                      f"the limit is {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except InvalidInputError:
        raise  # our own refusal (also a ValueError) keeps its message and code
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnprocessableError(f"cannot decode image {filename!r} ({type(exc).__name__}); send PNG or JPEG",
                                 code="bad_image") from None
