"""The street scene: a camera looking down a street of facades, lanes, cars, people and poles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semla.registry.synth.drawing import (
    BUILDING_COLOURS, FAR, NEAR, Camera, Canvas, bush, car, downsample, draw_windows, ground_quad, jitter,
    person, pole, sky_image, texture, tree,
)


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


def render_street(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
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
