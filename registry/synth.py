"""Deterministic synthetic segmentation data: four scene types in many appearance domains.

The data trains a tiny CLIP-like segmenter and one LoRA adapter per domain, so it has to
be cheap (numpy + Pillow only), fully deterministic and structured so that the *same*
scene can be seen under different conditions.

Why three registries
--------------------
A *domain* is a scene layout seen through an ordered chain of appearance *shifts*:

* :class:`Scene` owns the geometry and the class list (what is where, and the mask).
* :class:`Shift` owns the appearance change (fog, night, ...). Shifts never touch the mask.
* :class:`Domain` only names a scene plus a tuple of shift names.

Keeping the three apart means new scene types and new shifts are added with one
``register_*`` call each and compose freely: ``fog_night`` is just
``Domain("fog_night", "street", ("fog", "night"), ...)``. The street scene lives here; the
indoor, harbour and fields scenes in ``_synth_scenes.py``, the drawing primitives they
share in ``_synth_draw.py``.

The benchmark
-------------
:func:`benchmark_domains` lists 20 domains built like the SemLA benchmark's (whose 20 come
from 10 datasets): street scenes under weather x time of day and camera shifts, and rooms,
harbours and farmland under their own shifts. Class lists overlap between scenes where the
same thing appears. Each scene also has a clean domain (shift ``none``): the base model's
source set. :func:`split_seeds` gives every domain its own train and test seeds.

Determinism
-----------
The layout RNG is derived from ``(seed, index)`` only and each shift's RNG from
``(seed, index, shift name)``. Hence the same ``(seed, index)`` yields the identical mask in
every domain of a scene; only the appearance differs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from semla.registry._synth_draw import (
    BUILDING_COLOURS, FAR, NEAR, Camera, Canvas, box_blur, bush, car, downsample, draw_windows, glow,
    ground_quad, jitter, luma, person, pole, sky_image, smooth_noise, texture, to_uint8, tree,
)
from semla.registry._synth_scenes import (
    FIELDS_CLASSES, HARBOUR_CLASSES, INDOOR_CLASSES, render_fields, render_harbour, render_indoor,
)
from semla.registry.names import Registry
from semla.schemas.errors import InvalidInputError

__all__ = [
    "Scene",
    "Shift",
    "Domain",
    "SCENES",
    "SHIFTS",
    "DOMAINS",
    "STREET_CLASSES",
    "INDOOR_CLASSES",
    "HARBOUR_CLASSES",
    "FIELDS_CLASSES",
    "BENCHMARK_DOMAINS",
    "register_scene",
    "register_shift",
    "register_domain",
    "list_scenes",
    "list_shifts",
    "list_domains",
    "get_scene",
    "get_shift",
    "get_domain",
    "render",
    "write_dataset",
    "benchmark_domains",
    "split_seeds",
    "contact_sheet",
]

RenderFn = Callable[[np.random.Generator, int], "tuple[np.ndarray, np.ndarray]"]
ShiftFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]

MIN_SIZE = 16


# --------------------------------------------------------------------------------------
# Registry types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A scene layout generator.

    Attributes:
        name: Registry key.
        classes: Class names; value ``i`` in a mask means ``classes[i]``.
        render: ``(rng, size) -> (rgb, mask)`` with ``rgb`` float32 ``(size, size, 3)`` in
            ``[0, 1]`` and ``mask`` uint8 ``(size, size)`` with values ``< len(classes)``.
    """

    name: str
    classes: tuple[str, ...]
    render: RenderFn = field(repr=False, compare=False)


@dataclass(frozen=True)
class Shift:
    """An appearance shift; it changes pixels only, never the mask.

    Attributes:
        name: Registry key.
        description: One-line human description.
        apply: ``(rgb, rng) -> rgb`` on float32 ``(H, W, 3)`` images in ``[0, 1]``.
    """

    name: str
    description: str
    apply: ShiftFn = field(repr=False, compare=False)


@dataclass(frozen=True)
class Domain:
    """A named scene seen through an ordered chain of shifts.

    Attributes:
        name: Registry key.
        scene: Name of a registered :class:`Scene`.
        shifts: Names of registered :class:`Shift` objects, applied in order.
        description: One-line human description.
    """

    name: str
    scene: str
    shifts: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if isinstance(self.shifts, str):
            object.__setattr__(self, "shifts", (self.shifts,))
        else:
            object.__setattr__(self, "shifts", tuple(self.shifts))


SCENES: Registry[Scene] = Registry("scene")
SHIFTS: Registry[Shift] = Registry("shift")
DOMAINS: Registry[Domain] = Registry("domain")


def register_scene(scene: Scene) -> Scene:
    """Add a scene to :data:`SCENES`.

    Args:
        scene: The scene to register.

    Returns:
        The same scene (so the call can be used as an expression).

    Raises:
        InvalidInputError: If the name is taken, or the class list is empty or has duplicates
            or more than 256 entries.
    """
    classes = tuple(scene.classes)
    if not classes or len(set(classes)) != len(classes) or len(classes) > 256:
        raise InvalidInputError(f"scene {scene.name!r}: classes must be 1-256 unique names")
    return SCENES.register(scene.name, scene)


def register_shift(shift: Shift) -> Shift:
    """Add a shift to :data:`SHIFTS`.

    Args:
        shift: The shift to register.

    Returns:
        The same shift.

    Raises:
        InvalidInputError: If the name is taken.
    """
    return SHIFTS.register(shift.name, shift)


def register_domain(domain: Domain) -> Domain:
    """Add a domain to :data:`DOMAINS`; its scene and shifts must already be registered.

    Args:
        domain: The domain to register.

    Returns:
        The same domain.

    Raises:
        InvalidInputError: If the name is taken or it refers to an unknown scene or shift.
    """
    if domain.scene not in SCENES:
        raise InvalidInputError(f"domain {domain.name!r}: unknown scene {domain.scene!r}")
    missing = [s for s in domain.shifts if s not in SHIFTS]
    if missing:
        raise InvalidInputError(f"domain {domain.name!r}: unknown shift(s) {missing}")
    return DOMAINS.register(domain.name, domain)


def list_scenes() -> list[str]:
    """Return the sorted names of registered scenes."""
    return SCENES.names()


def list_shifts() -> list[str]:
    """Return the sorted names of registered shifts."""
    return SHIFTS.names()


def list_domains() -> list[str]:
    """Return the sorted names of registered domains."""
    return DOMAINS.names()


def get_scene(name: str) -> Scene:
    """Return a registered scene.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return SCENES.lookup(name)


def get_shift(name: str) -> Shift:
    """Return a registered shift.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return SHIFTS.lookup(name)


def get_domain(name: str) -> Domain:
    """Return a registered domain.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return DOMAINS.lookup(name)


# --------------------------------------------------------------------------------------
# Street scene
# --------------------------------------------------------------------------------------

STREET_CLASSES: tuple[str, ...] = (
    "sky",
    "road",
    "sidewalk",
    "building",
    "vegetation",
    "car",
    "person",
    "pole",
)
_SKY, _ROAD, _SIDEWALK, _BUILDING, _VEG, _CAR, _PERSON, _POLE = range(8)


@dataclass(frozen=True)
class _Street:
    """Lateral layout (metres, camera at x = 0)."""

    road_l: float
    road_r: float
    walk_l: float  # outer edge of the left sidewalk (< road_l)
    walk_r: float  # outer edge of the right sidewalk (> road_r)
    z_end: float  # side facades end here
    z_back: float  # the far row of buildings stands here


def _make_camera(rng: np.random.Generator, s: int) -> Camera:
    return Camera(
        f=s * rng.uniform(0.6, 0.95),
        hc=rng.uniform(1.3, 1.8),
        vx=s * rng.uniform(0.35, 0.65),
        hy=s * rng.uniform(0.34, 0.5),
    )


def _make_street(rng: np.random.Generator) -> _Street:
    road_l, road_r = -rng.uniform(2.0, 5.5), rng.uniform(2.0, 5.5)
    z_end = rng.uniform(40.0, 120.0)
    return _Street(
        road_l=road_l,
        road_r=road_r,
        walk_l=road_l - rng.uniform(2.0, 5.0),
        walk_r=road_r + rng.uniform(2.0, 5.0),
        z_end=z_end,
        z_back=z_end + rng.uniform(5.0, 60.0),
    )


def _draw_ground(cv: Canvas, cam: Camera, st: _Street, rng: np.random.Generator) -> None:
    grass = jitter(rng, (80, 130, 50), 0.2)
    cv.poly(ground_quad(cam, -400, 400, NEAR, FAR), grass, _VEG)
    walk = jitter(rng, (165, 158, 148) if rng.random() < 0.7 else (170, 110, 95), 0.12)
    cv.poly(ground_quad(cam, st.walk_l, st.road_l, NEAR, FAR), walk, _SIDEWALK)
    cv.poly(ground_quad(cam, st.road_r, st.walk_r, NEAR, FAR), walk, _SIDEWALK)
    kerb = jitter(rng, (195, 190, 180), 0.1)
    for x in (st.road_l, st.road_r - 0.15):
        cv.poly(ground_quad(cam, x, x + 0.15, NEAR, FAR), kerb, _SIDEWALK)
    grey = rng.uniform(65, 125)
    road = tuple(int(grey + d) for d in rng.uniform(-6, 6, 3))
    cv.poly(ground_quad(cam, st.road_l, st.road_r, NEAR, FAR), road, _ROAD)
    _draw_paving(cv, cam, st, rng)
    _draw_lanes(cv, cam, st, rng)


def _draw_paving(cv: Canvas, cam: Camera, st: _Street, rng: np.random.Generator) -> None:
    """Transverse joints on the sidewalks (appearance only)."""
    step = rng.uniform(1.0, 2.5)
    joint = jitter(rng, (120, 118, 112), 0.1)
    for z in np.arange(2.0, 40.0, step):
        if cam.scale(z) * 0.08 < 0.4:
            break
        for x0, x1 in ((st.walk_l, st.road_l), (st.road_r, st.walk_r)):
            cv.poly(ground_quad(cam, x0, x1, z, z + 0.08), joint, None)


def _draw_lanes(cv: Canvas, cam: Camera, st: _Street, rng: np.random.Generator) -> None:
    """Dashed centre line and optional solid edge lines (appearance only)."""
    yellow = rng.random() < 0.3
    paint = jitter(rng, (230, 200, 60) if yellow else (235, 235, 230), 0.08)
    centre = st.road_l + (st.road_r - st.road_l) * rng.uniform(0.4, 0.6)
    dash, gap = rng.uniform(2.0, 4.0), rng.uniform(3.0, 7.0)
    z = rng.uniform(0.5, dash + gap)
    while z < 80.0:
        cv.poly(ground_quad(cam, centre - 0.08, centre + 0.08, z, z + dash), paint, None)
        z += dash + gap
    if rng.random() < 0.5:
        for x in (st.road_l + 0.3, st.road_r - 0.42):
            cv.poly(ground_quad(cam, x, x + 0.12, NEAR, FAR), paint, None)


def _draw_facades(cv: Canvas, cam: Camera, st: _Street, rng: np.random.Generator,
                  side: int) -> None:
    """Buildings along one side of the street (side = -1 left, +1 right), far to near."""
    xw = st.walk_l if side < 0 else st.walk_r
    segments, z = [], NEAR
    while z < st.z_end:
        length = rng.uniform(6.0, 25.0)
        if rng.random() > 0.15:
            segments.append((z, min(z + length, st.z_end), rng.uniform(6.0, 25.0)))
        z += length
    for z0, z1, hb in reversed(segments):
        colour = jitter(rng, BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))], 0.15)
        depth = 12.0 * side
        end = [cam.pt(xw, 0, z0), cam.pt(xw + depth, 0, z0), cam.pt(xw + depth, hb, z0),
               cam.pt(xw, hb, z0)]
        cv.poly(end, tuple(int(c * 0.75) for c in colour), _BUILDING)
        wall = [cam.pt(xw, 0, z0), cam.pt(xw, 0, z1), cam.pt(xw, hb, z1), cam.pt(xw, hb, z0)]
        cv.poly(wall, colour, _BUILDING)

        def corners(a0, a1, u0, u1, z0=z0):
            return [cam.pt(xw, u0, z0 + a0), cam.pt(xw, u0, z0 + a1),
                    cam.pt(xw, u1, z0 + a1), cam.pt(xw, u1, z0 + a0)]

        draw_windows(cv, cam, corners, z1 - z0, hb, rng, min_px=2.0)


def _draw_back_row(cv: Canvas, cam: Camera, st: _Street, rng: np.random.Generator) -> None:
    """Frontal row of distant buildings, optionally leaving the road corridor open."""
    open_corridor = rng.random() < 0.5
    z = st.z_back
    x = -cam.vx / cam.scale(z) - rng.uniform(0, 15)
    x_max = (cv.size - cam.vx) / cam.scale(z)
    while x < x_max:
        width = rng.uniform(8.0, 30.0)
        hb = rng.uniform(8.0, 45.0)
        skip = rng.random() < 0.12 or (
            open_corridor and x < st.walk_r and x + width > st.walk_l)
        if not skip:
            colour = jitter(rng, BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))], 0.15)
            cv.poly([cam.pt(x, 0, z), cam.pt(x + width, 0, z), cam.pt(x + width, hb, z),
                     cam.pt(x, hb, z)], colour, _BUILDING)

            def corners(a0, a1, u0, u1, x=x):
                return [cam.pt(x + a0, u0, z), cam.pt(x + a1, u0, z),
                        cam.pt(x + a1, u1, z), cam.pt(x + a0, u1, z)]

            draw_windows(cv, cam, corners, width, hb, rng, min_px=1.5)
        x += width


# --- objects (drawn far to near) ------------------------------------------------------


def _plan_objects(cam: Camera, st: _Street, rng: np.random.Generator) -> list:
    """Return ``(z, kind, x, extra)`` tuples for everything standing in the street."""
    objs: list = []
    z_min = 4.0
    for _ in range(int(rng.integers(0, 5))):  # cars on the road
        x = rng.uniform(st.road_l + 1.1, st.road_r - 1.1) if st.road_r - st.road_l > 2.2 \
            else 0.5 * (st.road_l + st.road_r)
        objs.append((rng.uniform(z_min + 1.0, 45.0), "car", x, 0))
    for _ in range(int(rng.integers(0, 5))):  # people, mostly on sidewalks
        side = -1 if rng.random() < 0.5 else 1
        lo, hi = (st.walk_l, st.road_l) if side < 0 else (st.road_r, st.walk_r)
        x = rng.uniform(lo + 0.3, hi - 0.3)
        if rng.random() < 0.15:
            x = rng.uniform(st.road_l, st.road_r)
        objs.append((rng.uniform(z_min, 30.0), "person", x, 0))
    for _ in range(int(rng.integers(0, 4))):  # poles near the kerb
        side = -1 if rng.random() < 0.5 else 1
        x = st.road_l - 0.4 if side < 0 else st.road_r + 0.4
        objs.append((rng.uniform(z_min, 40.0), "pole", x, side))
    for _ in range(int(rng.integers(1, 6))):  # street trees and bushes
        side = -1 if rng.random() < 0.5 else 1
        kind = "tree" if rng.random() < 0.65 else "bush"
        if kind == "tree":
            x = (st.walk_l + 0.8 if rng.random() < 0.5 else st.road_l - 0.8) if side < 0 \
                else (st.walk_r - 0.8 if rng.random() < 0.5 else st.road_r + 0.8)
        else:
            x = st.walk_l - 0.2 if side < 0 else st.walk_r + 0.2
        objs.append((rng.uniform(z_min, 50.0), kind, x, side))
    objs.sort(key=lambda o: -o[0])
    return objs


def _draw_objects(cv: Canvas, cam: Camera, objs: list, rng: np.random.Generator) -> None:
    for z, kind, x, side in objs:
        if kind == "car":
            car(cv, cam, x, z, rng, _CAR)
        elif kind == "person":
            person(cv, cam, x, z, rng, _PERSON)
        elif kind == "pole":
            pole(cv, cam, x, z, side, rng, _POLE)
        elif kind == "tree":
            tree(cv, cam, x, z, rng, _VEG)
        else:
            bush(cv, cam, x, z, rng, _VEG)


# fine grain, mid (leafy/blotchy), low (weathering) noise amplitudes per class
_TEX_FINE = np.array([0.01, 0.07, 0.06, 0.04, 0.12, 0.03, 0.03, 0.04], np.float32)
_TEX_MID = np.array([0.0, 0.04, 0.05, 0.05, 0.3, 0.0, 0.0, 0.0], np.float32)
_TEX_LOW = np.array([0.0, 0.1, 0.08, 0.12, 0.1, 0.0, 0.0, 0.04], np.float32)


def _render_street(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one street view: supersampled 2x, then box-filtered (rgb) / nearest (mask)."""
    s = 2 * size
    cam, st = _make_camera(rng, s), _make_street(rng)
    cv = Canvas(s)
    _draw_ground(cv, cam, st, rng)
    _draw_back_row(cv, cam, st, rng)
    for side in (-1, 1):
        if rng.random() < 0.85:
            _draw_facades(cv, cam, st, rng, side)
    _draw_objects(cv, cam, _plan_objects(cam, st, rng), rng)

    mask, rgb = cv.arrays()
    rgb = np.where((mask == _SKY)[..., None], sky_image(rng, s, cam.hy), rgb)
    rgb = np.clip(texture(rgb, mask, rng, _TEX_FINE, _TEX_MID, _TEX_LOW), 0.0, 1.0)
    return downsample(rgb, mask, size)


# --------------------------------------------------------------------------------------
# Shifts
# --------------------------------------------------------------------------------------


def _shift_none(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rgb


def _shift_fog(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = rgb.shape
    grey = np.array([0.8, 0.82, 0.85], np.float32) * rng.uniform(0.92, 1.05)
    lo, hi = rng.uniform(0.55, 0.62), rng.uniform(0.75, 0.85)
    height = 1.0 - np.arange(h, dtype=np.float32) / max(h - 1, 1)  # 1 at top, 0 at bottom
    alpha = lo + (hi - lo) * height[:, None] ** 0.7
    alpha = alpha + 0.05 * smooth_noise(rng, h, w, 4)  # patchy
    alpha = np.clip(alpha, 0.0, 0.95)[..., None]
    out = box_blur(rgb, 1) * (1 - alpha) + grey * alpha
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_night(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = rgb.shape
    gain = rng.uniform(0.15, 0.3)
    tint = np.array([0.7, 0.85, 1.25], np.float32)
    out = (rgb ** 1.1) * gain * tint
    lights = np.zeros_like(out)
    for _ in range(int(rng.integers(3, 8))):
        if rng.random() < 0.5:  # street lamp, warm, upper half
            cx, cy = rng.uniform(0, w), rng.uniform(0.1 * h, 0.5 * h)
            colour = np.array([1.0, 0.75, 0.4], np.float32)
            pairs = [(cx, cy)]
        else:  # headlight pair, white, lower half
            cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.5 * h, 0.85 * h)
            d = rng.uniform(0.03, 0.1) * w
            colour = np.array([0.95, 0.95, 1.0], np.float32)
            pairs = [(cx - d, cy), (cx + d, cy)]
        sigma = rng.uniform(0.02, 0.05) * h
        for px, py in pairs:
            core = glow(h, w, px, py, max(0.6, sigma * 0.25))
            halo = glow(h, w, px, py, sigma) * rng.uniform(0.3, 0.6)
            lights += (core + halo)[..., None] * colour
    out = out + lights + rng.normal(0.0, rng.uniform(0.02, 0.04), out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_rain(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = rgb.shape
    cast = np.array([0.42, 0.47, 0.55], np.float32)
    out = box_blur(rgb, 1) * rng.uniform(0.55, 0.7)
    out = out * 0.7 + cast * 0.3 * rng.uniform(0.8, 1.1)
    layer = Image.new("L", (w * 2, h * 2), 0)
    draw = ImageDraw.Draw(layer)
    angle = np.deg2rad(rng.uniform(-25, 25))
    n = int(h * w / 40 * rng.uniform(0.8, 1.2))
    for _ in range(n):
        x, y = rng.uniform(-0.2 * w, 1.2 * w) * 2, rng.uniform(-0.1 * h, h) * 2
        length = rng.uniform(0.06, 0.16) * h * 2
        dx, dy = np.sin(angle) * length, np.cos(angle) * length
        draw.line([(x, y), (x + dx, y + dy)], fill=int(rng.uniform(110, 230)), width=1)
    streak = np.asarray(layer.resize((w, h), Image.BOX), np.float32)[..., None] / 255.0
    streak = np.clip(streak * 1.6, 0, 0.7)
    out = out * (1 - streak) + np.array([0.8, 0.83, 0.88], np.float32) * streak
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_snow(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = rgb.shape
    lum = luma(rgb)[..., None]
    desat = rgb * 0.4 + lum * 0.6
    out = desat * rng.uniform(0.5, 0.6) + rng.uniform(0.35, 0.42)
    out = out * np.array([0.97, 0.99, 1.03], np.float32)
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    scale = h / 96.0
    for _ in range(int(h * w / 70 * rng.uniform(0.8, 1.2))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = (rng.uniform(0.0, 1.0) ** 3 * 1.8 + 0.4) * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(160, 255)))
    flakes = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), np.float32)[..., None]
    flakes = np.clip(flakes / 255.0 * 1.3, 0, 1)
    out = out * (1 - flakes) + flakes
    return np.clip(out, 0, 1).astype(np.float32)


_SEPIA = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32
)


def _shift_sepia(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = rgb @ _SEPIA.T
    contrast = rng.uniform(0.5, 0.65)
    tone = np.array([0.62, 0.52, 0.38], np.float32)
    out = tone + contrast * (out - out.mean(axis=(0, 1)))
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Motion blur of a panning camera: the mean of copies shifted along a near-level line."""
    h, w, _ = rgb.shape
    length = max(3, int(round(w * rng.uniform(0.07, 0.12))))
    angle = rng.uniform(-0.35, 0.35)  # radians from horizontal
    steps = np.linspace(-0.5, 0.5, length) * length
    dx, dy = np.rint(steps * np.cos(angle)).astype(int), np.rint(steps * np.sin(angle)).astype(int)
    pad = length
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(rgb)
    for ox, oy in zip(dx, dy):
        out += padded[pad + oy:pad + oy + h, pad + ox:pad + ox + w]
    return np.clip(out / length, 0, 1).astype(np.float32)


def _shift_noise(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: signal-dependent shot noise, read noise, colour speckle and row banding."""
    h, w, _ = rgb.shape
    shot, read = rng.uniform(0.015, 0.03), rng.uniform(0.06, 0.09)
    sigma = np.sqrt(shot * rgb + read * read)
    grain = rng.standard_normal((h, w, 1)).astype(np.float32) * 0.6  # shared by the channels
    chroma = rng.standard_normal((h, w, 3)).astype(np.float32) * 0.8
    banding = rng.normal(0.0, 0.02, (h, 1, 1)).astype(np.float32)
    out = rgb * rng.uniform(0.85, 0.95) + sigma * (grain + chroma) + banding
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_lowres(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-resolution camera shown enlarged: box-downsampled by 3-4.5x, pixels repeated."""
    h, w, _ = rgb.shape
    factor = rng.uniform(3.0, 4.5)
    small = (max(2, int(round(w / factor))), max(2, int(round(h / factor))))
    out = np.empty_like(rgb)
    for c in range(3):
        band = Image.fromarray(np.ascontiguousarray(rgb[..., c]))  # mode "F"
        band = band.resize(small, Image.BOX).resize((w, h), Image.NEAREST)
        out[..., c] = np.asarray(band, dtype=np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_cast(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A wrong white balance under fluorescent light: a green-teal cast, contrast kept."""
    gains = np.array([0.62, 1.0, 0.86], np.float32) * rng.uniform(0.92, 1.05, 3).astype(np.float32)
    lift = np.array([0.0, 0.06, 0.05], np.float32)
    return np.clip(rgb * gains + lift, 0, 1).astype(np.float32)


def _shift_tungsten(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Warm tungsten light on a daylight white balance: saturated orange, falling off to the edges."""
    h, w, _ = rgb.shape
    gains = np.array([1.18, 0.86, 0.5], np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.6) * h, rng.uniform(0.25, 0.75) * w
    light = 0.6 + 0.55 * glow(h, w, cx, cy, 0.55 * max(h, w))[..., None]
    out = (rgb ** 0.9) * gains * light
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_dark(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dim room without lamps: low exposure, crushed shadows, a slight cold tint."""
    gain = rng.uniform(0.38, 0.5)
    tint = np.array([0.9, 0.95, 1.1], np.float32)
    return np.clip((rgb ** 1.2) * gain * tint, 0, 1).astype(np.float32)


def _shift_dusk(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dusk: dim warm-pink light, an orange glow low in the sky, a darker violet zenith."""
    h, w, _ = rgb.shape
    gain = rng.uniform(0.45, 0.6)
    out = (rgb ** 1.15) * gain * np.array([1.2, 0.82, 0.78], np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None, None] / max(h - 1, 1)  # 0 top, 1 bottom
    centre, width = rng.uniform(0.3, 0.5), rng.uniform(0.12, 0.2)
    band = np.exp(-(((rows - centre) / width) ** 2))
    out = out + band * np.array([0.38, 0.18, 0.05], np.float32) * rng.uniform(0.8, 1.1)
    zenith = np.clip(1.0 - rows / max(centre, 1e-3), 0, 1)
    out = out * (1 - 0.45 * zenith) + zenith * np.array([0.1, 0.04, 0.14], np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_bloom(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light scattered in the air: wide soft halos around bright lamps, a veil over dark parts."""
    h, w, _ = rgb.shape
    bright = np.clip(rgb - 0.5, 0, None)
    radius = max(1, int(round(w * rng.uniform(0.04, 0.07))))
    halo = box_blur(box_blur(bright, radius), radius)
    veil = float(rgb.mean()) * rng.uniform(0.5, 0.8)
    out = rgb + halo * rng.uniform(2.5, 4.0) + veil * np.array([0.9, 0.9, 0.95], np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def _shift_haze(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Summer haze: a thin warm-white veil, thicker toward the horizon, colours washed out."""
    h, w, _ = rgb.shape
    veil = np.array([0.93, 0.88, 0.76], np.float32) * rng.uniform(0.95, 1.03)
    height = 1.0 - np.arange(h, dtype=np.float32) / max(h - 1, 1)  # 1 at top, 0 at bottom
    alpha = rng.uniform(0.28, 0.36) + rng.uniform(0.15, 0.25) * height[:, None, None]
    lum = luma(rgb)[..., None]
    washed = rgb * 0.6 + lum * 0.4
    out = washed * (1 - alpha) + veil * alpha
    return np.clip(out, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------
# Built-in registrations
# --------------------------------------------------------------------------------------

register_scene(Scene("street", STREET_CLASSES, _render_street))

register_shift(Shift("none", "identity: no appearance change", _shift_none))
register_shift(Shift("fog", "heavy fog: contrast lost toward light grey, denser with height",
                     _shift_fog))
register_shift(Shift("night", "night: dark blue-tinted, sensor noise, glowing lamps/headlights",
                     _shift_night))
register_shift(Shift("rain", "rain: dark grey-blue cast, slight blur, diagonal streaks",
                     _shift_rain))
register_shift(Shift("snow", "snowfall: bright, desaturated, many white flakes", _shift_snow))
register_shift(Shift("sepia", "sepia photo: strong sepia colour matrix, low contrast",
                     _shift_sepia))

register_shift(Shift("blur", "motion blur: a camera panning during the exposure", _shift_blur))
register_shift(Shift("noise", "sensor noise: strong grain, colour speckle and row banding",
                     _shift_noise))
register_shift(Shift("lowres", "low resolution: 3-4.5x fewer pixels per side, shown blocky",
                     _shift_lowres))
register_shift(Shift("cast", "colour cast: green-teal white balance of fluorescent light",
                     _shift_cast))
register_shift(Shift("tungsten", "tungsten light: warm orange cast, brighter in the middle",
                     _shift_tungsten))
register_shift(Shift("dark", "dim light: underexposed, crushed shadows, no lamps", _shift_dark))
register_shift(Shift("dusk", "dusk: dim warm-pink light, orange glow low in the sky", _shift_dusk))
register_shift(Shift("bloom", "scattering air: wide halos around lamps, a light veil", _shift_bloom))
register_shift(Shift("haze", "summer haze: warm-white veil, thicker toward the horizon",
                     _shift_haze))

register_domain(Domain("clear", "street", ("none",), "street scenes on a clear day"))
register_domain(Domain("fog", "street", ("fog",), "the same streets in heavy fog"))
register_domain(Domain("night", "street", ("night",), "the same streets at night, lit by lamps"))
register_domain(Domain("rain", "street", ("rain",), "the same streets in heavy rain"))
register_domain(Domain("snow", "street", ("snow",), "the same streets during snowfall"))
register_domain(Domain("sepia", "street", ("sepia",), "the same streets as old sepia photos"))

register_scene(Scene("indoor", INDOOR_CLASSES, render_indoor))
register_scene(Scene("harbour", HARBOUR_CLASSES, render_harbour))
register_scene(Scene("fields", FIELDS_CLASSES, render_fields))

# street: weather x time of day, and camera shifts
register_domain(Domain("fog_night", "street", ("fog", "night", "bloom"), "streets on a foggy night"))
register_domain(Domain("rain_night", "street", ("night", "rain"), "streets on a rainy night"))
register_domain(Domain("snow_night", "street", ("snow", "night"), "streets on a snowy night"))
register_domain(Domain("blur", "street", ("blur",), "streets seen by a panning camera"))
register_domain(Domain("noise", "street", ("noise",), "streets seen by a noisy sensor"))
register_domain(Domain("lowres", "street", ("lowres",), "streets seen by a low-resolution camera"))
register_domain(Domain("cast", "street", ("cast",), "streets with a green-teal colour cast"))
# the clean source domains of the other scenes (the base model trains on these)
register_domain(Domain("indoor", "indoor", ("none",), "rooms in even light"))
register_domain(Domain("harbour", "harbour", ("none",), "harbours on a clear day"))
register_domain(Domain("fields", "fields", ("none",), "farmland on a clear day"))
# the other scenes under their own shifts
register_domain(Domain("indoor_dim", "indoor", ("dark", "noise"), "dim rooms seen by a noisy sensor"))
register_domain(Domain("indoor_warm", "indoor", ("tungsten",), "rooms lit by tungsten lamps"))
register_domain(Domain("indoor_blur", "indoor", ("blur",), "rooms seen by a panning camera"))
register_domain(Domain("harbour_fog", "harbour", ("fog",), "harbours in heavy fog"))
register_domain(Domain("harbour_dusk", "harbour", ("dusk",), "harbours at dusk"))
register_domain(Domain("harbour_rain", "harbour", ("rain",), "harbours in heavy rain"))
register_domain(Domain("fields_snow", "fields", ("snow",), "farmland during snowfall"))
register_domain(Domain("fields_haze", "fields", ("haze",), "farmland in summer haze"))

BENCHMARK_DOMAINS: tuple[str, ...] = (
    # 8 street domains: weather x time of day
    "clear", "night", "fog", "rain", "snow", "fog_night", "rain_night", "snow_night",
    # 4 street domains: camera shifts
    "blur", "noise", "lowres", "cast",
    # 8 domains with other layouts and class lists
    "indoor_dim", "indoor_warm", "indoor_blur", "harbour_fog", "harbour_dusk", "harbour_rain",
    "fields_snow", "fields_haze",
)


def benchmark_domains() -> list[str]:
    """The 20 benchmark domains in their fixed order.

    Built like the SemLA benchmark, whose 20 domains come from 10 datasets: 12 street
    domains (weather x time of day, camera shifts) and 8 with other layouts and class lists.
    The clean source domains of the other scenes are not among them; clear street is, as
    Cityscapes is in the paper.
    """
    return list(BENCHMARK_DOMAINS)


def split_seeds(domain: str) -> tuple[int, int]:
    """``(train_seed, test_seed)`` of a domain: distinct, and fixed by its name alone.

    Every domain draws its own layouts (two domains of one scene never share images) and its
    test set never overlaps its training set.

    Raises:
        UnknownNameError: Unknown domain.
    """
    base = 2 * zlib.crc32(get_domain(domain).name.encode("utf-8"))
    return base, base + 1


# --------------------------------------------------------------------------------------
# Rendering and dataset writing
# --------------------------------------------------------------------------------------


def _check_args(seed: int, index: int, size: int) -> None:
    if int(seed) < 0 or int(index) < 0:
        raise InvalidInputError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if int(size) < MIN_SIZE:
        raise InvalidInputError(f"size must be >= {MIN_SIZE}, got {size}")


def _shift_rng(seed: int, index: int, shift: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, 1, zlib.crc32(shift.encode("utf-8"))])


def render(domain: str, seed: int, index: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its mask.

    The layout depends on ``(seed, index)`` only, so the mask is identical in every
    domain that shares the scene; each shift draws its randomness from
    ``(seed, index, shift name)``.

    Args:
        domain: Registered domain name (see :func:`list_domains`).
        seed: Non-negative dataset seed.
        index: Non-negative image index.
        size: Side length in pixels (>= 16).

    Returns:
        ``(rgb, mask)``: uint8 arrays of shape ``(size, size, 3)`` and ``(size, size)``;
        mask values index the scene's ``classes``.

    Raises:
        UnknownNameError: Unknown domain.
        ValueError: Negative seed/index or too small size.
    """
    dom = get_domain(domain)
    _check_args(seed, index, size)
    scene = get_scene(dom.scene)
    rgb, mask = scene.render(np.random.default_rng([int(seed), int(index), 0]), int(size))
    if mask.shape != (size, size) or rgb.shape != (size, size, 3):
        raise InvalidInputError(f"scene {scene.name!r} returned wrong shapes {rgb.shape}, {mask.shape}")
    if int(mask.max()) >= len(scene.classes):
        raise InvalidInputError(f"scene {scene.name!r} returned mask values >= {len(scene.classes)}")
    for name in dom.shifts:
        rgb = get_shift(name).apply(rgb.astype(np.float32), _shift_rng(int(seed), int(index), name))
    return to_uint8(rgb), mask.astype(np.uint8)


def _fill_dataset(tmp: Path, dom: Domain, n: int, seed: int, size: int, progress: bool) -> None:
    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    classes = get_scene(dom.scene).classes
    (tmp / "classes.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
    meta = {"domain": dom.name, "scene": dom.scene, "shifts": list(dom.shifts),
            "seed": seed, "n": n, "size": size}
    (tmp / "domain.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    indices = range(n)
    if progress:
        from tqdm import tqdm  # optional dependency, only needed for the bar

        indices = tqdm(indices, desc=f"synth {dom.name}", unit="img", file=sys.stderr)
    for i in indices:
        rgb, mask = render(dom.name, seed, i, size)
        Image.fromarray(rgb).save(tmp / "images" / f"{i:05d}.png")
        Image.fromarray(mask).save(tmp / "masks" / f"{i:05d}.png")


def write_dataset(domain: str, n: int, seed: int, out: Path | str, size: int = 96,
                  progress: bool = False) -> Path:
    """Write ``n`` rendered images of a domain to ``out`` atomically.

    Layout: ``images/00000.png`` (RGB), ``masks/00000.png`` (mode ``L``, class index per
    pixel), ``classes.txt`` (one name per line) and ``domain.json``
    (``domain, scene, shifts, seed, n, size``). Everything is built in a temporary
    directory next to ``out`` and renamed into place; on failure it is removed.

    Args:
        domain: Registered domain name.
        n: Number of images (>= 1).
        seed: Non-negative dataset seed.
        out: Target directory; must not exist or be empty.
        size: Image side in pixels (>= 16).
        progress: Show a tqdm progress bar on stderr.

    Returns:
        The resolved ``out`` path.

    Raises:
        UnknownNameError: Unknown domain.
        ValueError: ``n < 1``, ``size < 16`` or negative seed.
        FileExistsError: ``out`` exists and is a file or a non-empty directory.
    """
    dom = get_domain(domain)
    if int(n) < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    _check_args(seed, 0, size)
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"refusing to overwrite {out}: it exists and is not an empty "
                              f"directory; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _fill_dataset(tmp, dom, int(n), int(seed), int(size), progress)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace it portably
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------


# Mask colours by class name (Cityscapes and ADE20K colours where those datasets have the class).
_MASK_COLOURS = {
    "sky": (70, 130, 180), "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70),
    "vegetation": (107, 142, 35), "car": (0, 0, 142), "person": (220, 20, 60), "pole": (153, 153, 153),
    "wall": (120, 120, 120), "floor": (80, 50, 50), "ceiling": (120, 120, 80), "window": (230, 230, 230),
    "door": (8, 255, 51), "table": (255, 6, 82), "chair": (204, 70, 3), "shelf": (150, 100, 255),
    "lamp": (224, 255, 8), "water": (61, 230, 250), "boat": (255, 184, 6), "pier": (160, 100, 40),
    "field": (235, 210, 120), "fence": (190, 153, 153), "animal": (0, 102, 200),
}


def _class_colours() -> dict[str, tuple[int, int, int]]:
    """One colour per class name over every registered scene (same name, same colour)."""
    names = sorted({c for scene in SCENES.values() for c in scene.classes})
    return {name: _MASK_COLOURS.get(name) or tuple(int(v) for v in np.random.default_rng(
        zlib.crc32(name.encode("utf-8"))).integers(0, 256, 3)) for name in names}


def contact_sheet(domains: list[str], path: Path | str, n: int = 4, size: int = 96,
                  seed: int | None = None, colours: int | None = None) -> Path:
    """Save a PNG with one row per domain: its name and shifts, then ``n`` images beside their masks.

    Masks are drawn in one colour per class name across all scenes; a legend closes the sheet.

    Args:
        domains: Registered domain names, one row each.
        path: Where to write the PNG (parent folders are created).
        n: Image and mask pairs per row.
        size: Image side in pixels.
        seed: Dataset seed; ``None`` shows each domain's test images (:func:`split_seeds`).
        colours: Reduce the sheet to this many colours (a far smaller file); ``None`` keeps
            every pixel exact.

    Returns:
        The path written.

    Raises:
        UnknownNameError: Unknown domain.
    """
    palette = _class_colours()
    label_w, gap = 150, 4
    row_h = size + gap
    legend = sorted(palette)
    per_line = 6
    legend_h = 16 * ((len(legend) + per_line - 1) // per_line) + gap
    width = label_w + n * (2 * size + gap)
    sheet = Image.new("RGB", (width, row_h * len(domains) + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(domains):
        dom = get_domain(name)
        classes = get_scene(dom.scene).classes
        lut = np.array([palette[c] for c in classes], np.uint8)
        row_seed = split_seeds(name)[1] if seed is None else seed
        y = row * row_h
        draw.text((4, y + 4), name, fill=(0, 0, 0))
        draw.text((4, y + 20), dom.scene, fill=(90, 90, 90))
        draw.text((4, y + 36), "+".join(dom.shifts), fill=(90, 90, 90))
        for i in range(n):
            rgb, mask = render(name, row_seed, i, size)
            x = label_w + i * (2 * size + gap)
            sheet.paste(Image.fromarray(rgb), (x, y))
            sheet.paste(Image.fromarray(lut[mask]), (x + size, y))
    y = row_h * len(domains)
    cell = (width - 8) // per_line
    for i, name in enumerate(legend):
        x, yy = 4 + (i % per_line) * cell, y + 16 * (i // per_line)
        draw.rectangle([x, yy + 2, x + 11, yy + 13], fill=palette[name])
        draw.text((x + 16, yy + 2), name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if colours is not None:
        sheet = sheet.quantize(int(colours), method=Image.Quantize.MEDIANCUT)
    sheet.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m semla.registry.synth",
                                     description="Save a contact sheet of synthetic domains.")
    parser.add_argument("--sheet", type=Path, required=True, help="PNG to write")
    parser.add_argument("--domains", nargs="+", default=None,
                        help="domains, one row each (default: the 20 benchmark domains)")
    parser.add_argument("--n", type=int, default=4, help="image and mask pairs per row")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--colours", type=int, default=None,
                        help="reduce the sheet to this many colours (e.g. 256, a smaller file)")
    args = parser.parse_args(argv)
    out = contact_sheet(args.domains or benchmark_domains(), args.sheet, n=args.n, size=args.size,
                        colours=args.colours)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
