"""Indoor, harbour and fields scenes for :mod:`semla.registry.synth`.

Each scene has its own layout and class list; the lists share names with the street scene
where the same thing appears (``sky``, ``building``, ``vegetation``, ``road``, ``person``,
``pole``), so a model trained on several scenes learns one meaning per name. The renderers
follow the street scene's contract: ``(rng, size) -> (rgb, mask)``, drawn at twice the size
on a :class:`~semla.registry.synth.drawing.Canvas` and box-filtered down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from semla.registry.synth.drawing import (
    BUILDING_COLOURS, FAR, NEAR, Camera, Canvas, bush, downsample, draw_windows, ground_quad, jitter,
    person, pole, sky_image, texture, tree,
)

__all__ = ["INDOOR_CLASSES", "HARBOUR_CLASSES", "FIELDS_CLASSES", "render_indoor", "render_harbour",
           "render_fields"]


def _shade(colour: tuple, k: float) -> tuple:
    return tuple(int(min(255, c * k)) for c in colour)


def _box(cv: Canvas, cam: Camera, x0: float, x1: float, h0: float, h1: float, z0: float, z1: float,
         colour: tuple, cls: int | None) -> None:
    """An axis-aligned box with the faces a camera at ``x = 0``, height ``cam.hc`` sees."""
    if x1 < 0:  # the camera sees the right side
        cv.poly([cam.pt(x1, h0, z0), cam.pt(x1, h0, z1), cam.pt(x1, h1, z1), cam.pt(x1, h1, z0)],
                _shade(colour, 0.78), cls)
    elif x0 > 0:  # ... or the left side
        cv.poly([cam.pt(x0, h0, z0), cam.pt(x0, h0, z1), cam.pt(x0, h1, z1), cam.pt(x0, h1, z0)],
                _shade(colour, 0.78), cls)
    if h1 < cam.hc:  # top, seen from above
        cv.poly([cam.pt(x0, h1, z0), cam.pt(x1, h1, z0), cam.pt(x1, h1, z1), cam.pt(x0, h1, z1)],
                _shade(colour, 1.12), cls)
    elif h0 > cam.hc:  # underside, seen from below
        cv.poly([cam.pt(x0, h0, z0), cam.pt(x1, h0, z0), cam.pt(x1, h0, z1), cam.pt(x0, h0, z1)],
                _shade(colour, 0.65), cls)
    cv.poly([cam.pt(x0, h0, z0), cam.pt(x1, h0, z0), cam.pt(x1, h1, z0), cam.pt(x0, h1, z0)], colour, cls)


def _pick(rng: np.random.Generator, palette: list, amount: float) -> tuple:
    return jitter(rng, palette[rng.integers(len(palette))], amount)


def _texture_table(rows: list[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (grain, blotch, weathering) amplitudes as the three arrays ``texture`` takes."""
    table = np.array(rows, np.float32)
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()


# --------------------------------------------------------------------------------------
# Indoor: a room seen from inside, one-point perspective
# --------------------------------------------------------------------------------------

INDOOR_CLASSES: tuple[str, ...] = (
    "wall", "floor", "ceiling", "window", "door", "table", "chair", "shelf", "lamp", "person",
)
_I_WALL, _I_FLOOR, _I_CEILING, _I_WINDOW, _I_DOOR, _I_TABLE, _I_CHAIR, _I_SHELF, _I_LAMP, _I_PERSON = range(10)
_I_TEXTURE = _texture_table([
    (0.02, 0.02, 0.05), (0.05, 0.05, 0.08), (0.01, 0.0, 0.04), (0.01, 0.0, 0.02), (0.03, 0.0, 0.04),
    (0.03, 0.02, 0.04), (0.03, 0.0, 0.03), (0.03, 0.0, 0.03), (0.01, 0.0, 0.0), (0.03, 0.0, 0.0),
])

_WALL_COLOURS = [(225, 215, 195), (200, 205, 210), (185, 205, 222), (200, 218, 192), (236, 226, 210),
                 (214, 188, 168), (172, 164, 156), (230, 200, 150)]
_FLOORS = {"wood": (150, 104, 64), "oak": (192, 150, 100), "tile": (176, 173, 166),
           "red carpet": (128, 58, 54), "blue carpet": (70, 86, 122), "grey carpet": (112, 110, 104)}
_WOOD = [(120, 80, 45), (170, 125, 80), (95, 60, 40), (200, 170, 120)]
_FURNITURE = _WOOD + [(235, 235, 230), (45, 42, 40), (150, 150, 150)]
_FABRIC = [(170, 40, 40), (40, 90, 150), (60, 120, 70), (220, 200, 160), (60, 60, 65), (200, 120, 40)]
_BOOKS = [(160, 40, 40), (40, 70, 140), (50, 110, 60), (200, 170, 60), (230, 225, 210), (90, 50, 90),
          (30, 30, 30), (190, 100, 40)]
_LAMPLIGHT = (255, 236, 185)


@dataclass(frozen=True)
class _Room:
    """A box room in metres: walls at ``x = xl``, ``x = xr`` and ``z = zb``; floor 0, ceiling ``height``."""

    xl: float
    xr: float
    height: float
    zb: float

    def wall_pt(self, cam: Camera, wall: str, a: float, h: float) -> tuple[float, float]:
        """A point on a wall at ``a`` along it (x on the back wall, z on the side walls)."""
        if wall == "back":
            return cam.pt(a, h, self.zb)
        return cam.pt(self.xl if wall == "left" else self.xr, h, a)


def _room_shell(cv: Canvas, cam: Camera, room: _Room, rng: np.random.Generator) -> None:
    z0 = 0.3
    wall = _pick(rng, _WALL_COLOURS, 0.08)
    ceiling = jitter(rng, (236, 236, 230), 0.04)
    kind = list(_FLOORS)[rng.integers(len(_FLOORS))]
    floor = jitter(rng, _FLOORS[kind], 0.12)
    xl, xr, hh, zb = room.xl, room.xr, room.height, room.zb
    cv.poly([cam.pt(xl, hh, z0), cam.pt(xr, hh, z0), cam.pt(xr, hh, zb), cam.pt(xl, hh, zb)], ceiling,
            _I_CEILING)
    cv.poly(ground_quad(cam, xl, xr, z0, zb), floor, _I_FLOOR)
    joint = _shade(floor, 0.8)
    if kind in ("wood", "oak", "tile"):  # boards or tiles (appearance only)
        step = rng.uniform(0.14, 0.22) if kind != "tile" else rng.uniform(0.4, 0.6)
        for x in np.arange(xl + step, xr, step):
            cv.poly(ground_quad(cam, x, x + 0.015, z0, zb), joint, None)
        if kind == "tile":
            for z in np.arange(1.0, zb, step):
                cv.poly(ground_quad(cam, xl, xr, z, z + 0.015), joint, None)
    for x, k in ((xl, 0.86), (xr, 0.8)):
        cv.poly([cam.pt(x, 0, z0), cam.pt(x, 0, zb), cam.pt(x, hh, zb), cam.pt(x, hh, z0)], _shade(wall, k),
                _I_WALL)
    cv.poly([cam.pt(xl, 0, zb), cam.pt(xr, 0, zb), cam.pt(xr, hh, zb), cam.pt(xl, hh, zb)], wall, _I_WALL)
    skirting = jitter(rng, (240, 238, 232) if rng.random() < 0.6 else (110, 80, 55), 0.05)
    for x in (xl, xr):
        cv.poly([cam.pt(x, 0, z0), cam.pt(x, 0, zb), cam.pt(x, 0.1, zb), cam.pt(x, 0.1, z0)], skirting, _I_WALL)
    cv.poly([cam.pt(xl, 0, zb), cam.pt(xr, 0, zb), cam.pt(xr, 0.1, zb), cam.pt(xl, 0.1, zb)], skirting, _I_WALL)


def _wall_rect(cv: Canvas, cam: Camera, room: _Room, wall: str, a0: float, a1: float, h0: float, h1: float,
               colour: tuple, cls: int | None) -> None:
    cv.poly([room.wall_pt(cam, wall, a0, h0), room.wall_pt(cam, wall, a1, h0),
             room.wall_pt(cam, wall, a1, h1), room.wall_pt(cam, wall, a0, h1)], colour, cls)


def _window(cv, cam, room, wall, a0, a1, h0, h1, rng) -> None:
    frame = jitter(rng, (240, 240, 236) if rng.random() < 0.6 else (120, 85, 55), 0.05)
    _wall_rect(cv, cam, room, wall, a0, a1, h0, h1, frame, _I_WINDOW)
    m = 0.07
    sky = jitter(rng, (175, 205, 236), 0.08)
    _wall_rect(cv, cam, room, wall, a0 + m, a1 - m, h0 + m, h1 - m, sky, _I_WINDOW)
    if rng.random() < 0.6:  # trees or houses outside
        outside = jitter(rng, (90, 140, 70) if rng.random() < 0.6 else (190, 160, 130), 0.15)
        _wall_rect(cv, cam, room, wall, a0 + m, a1 - m, h0 + m, h0 + m + (h1 - h0) * rng.uniform(0.2, 0.5),
                   outside, _I_WINDOW)
    mid = 0.5 * (a0 + a1)
    _wall_rect(cv, cam, room, wall, mid - 0.025, mid + 0.025, h0, h1, frame, _I_WINDOW)
    if rng.random() < 0.5:
        hm = 0.5 * (h0 + h1)
        _wall_rect(cv, cam, room, wall, a0, a1, hm - 0.025, hm + 0.025, frame, _I_WINDOW)


def _door(cv, cam, room, wall, a0, a1, h1, rng) -> None:
    leaf = _pick(rng, _WOOD + [(236, 236, 230), (130, 140, 150)], 0.08)
    _wall_rect(cv, cam, room, wall, a0 - 0.06, a1 + 0.06, 0.0, h1 + 0.06, _shade(leaf, 0.85), _I_DOOR)
    _wall_rect(cv, cam, room, wall, a0, a1, 0.0, h1, leaf, _I_DOOR)
    for p0, p1 in ((0.12, 0.45), (0.55, 0.9)):  # panels (appearance only)
        _wall_rect(cv, cam, room, wall, a0 + 0.12, a1 - 0.12, h1 * p0, h1 * p1, _shade(leaf, 0.92), _I_DOOR)
    knob = a1 - 0.1 if rng.random() < 0.5 else a0 + 0.1
    _wall_rect(cv, cam, room, wall, knob - 0.03, knob + 0.03, 0.95, 1.02, (200, 180, 90), _I_DOOR)


def _picture(cv, cam, room, wall, a0, a1, h0, h1, rng) -> None:
    """A framed picture: part of the wall."""
    _wall_rect(cv, cam, room, wall, a0, a1, h0, h1, _pick(rng, _WOOD + [(30, 30, 30)], 0.1), _I_WALL)
    m = 0.05
    _wall_rect(cv, cam, room, wall, a0 + m, a1 - m, h0 + m, h1 - m, _pick(rng, _BOOKS, 0.3), _I_WALL)


def _shelf(cv, cam, room, wall, a0, a1, top, rng) -> None:
    """A bookcase 0.35 m deep standing against a wall, its books facing the room."""
    wood = _pick(rng, _FURNITURE, 0.08)
    depth = 0.35
    if wall == "back":
        _box(cv, cam, a0, a1, 0.0, top, room.zb - depth, room.zb, wood, _I_SHELF)

        def front(a, h):
            return cam.pt(a, h, room.zb - depth)
    else:
        x = room.xl + depth if wall == "left" else room.xr - depth
        x0, x1 = sorted((x, room.xl if wall == "left" else room.xr))
        _box(cv, cam, x0, x1, 0.0, top, a0, a1, wood, _I_SHELF)
        cv.poly([cam.pt(x0, top, a0), cam.pt(x1, top, a0), cam.pt(x1, 0, a0), cam.pt(x0, 0, a0)],
                _shade(wood, 0.9), _I_SHELF)

        def front(a, h):
            return cam.pt(x, h, a)
    rows = max(2, int(top / 0.38))
    board = 0.03
    inside = _shade(wood, 0.45)
    for r in range(rows):
        h0, h1 = board + r * (top - board) / rows, (r + 1) * (top - board) / rows
        cv.poly([front(a0 + 0.04, h0), front(a1 - 0.04, h0), front(a1 - 0.04, h1), front(a0 + 0.04, h1)],
                inside, _I_SHELF)
        a = a0 + 0.05
        while a < a1 - 0.1:
            w = rng.uniform(0.03, 0.08)
            if rng.random() < 0.85:
                hb = h0 + (h1 - h0) * rng.uniform(0.6, 0.92)
                cv.poly([front(a, h0), front(a + w, h0), front(a + w, hb), front(a, hb)], _pick(rng, _BOOKS, 0.15),
                        _I_SHELF)
            a += w + 0.004


def _wall_items(cv: Canvas, cam: Camera, room: _Room, rng: np.random.Generator, size: int) -> None:
    """Windows, doors, bookcases and pictures on the three walls, without overlaps."""
    spans: dict[str, tuple[float, float]] = {"back": (room.xl + 0.2, room.xr - 0.2)}
    # side walls only from where they enter the picture
    z_left = max(1.0, cam.f * -room.xl / max(cam.vx, 1.0)) + 0.3
    z_right = max(1.0, cam.f * room.xr / max(size - cam.vx, 1.0)) + 0.3
    if room.zb - 0.3 - z_left > 1.2:
        spans["left"] = (z_left, room.zb - 0.3)
    if room.zb - 0.3 - z_right > 1.2:
        spans["right"] = (z_right, room.zb - 0.3)
    taken: dict[str, list[tuple[float, float]]] = {w: [] for w in spans}
    walls = sorted(spans)
    wishes = (["window"] * int(rng.integers(1, 4)) + ["door"] * int(rng.random() < 0.7)
              + ["shelf"] * int(rng.integers(0, 3)) + ["picture"] * int(rng.integers(0, 3)))
    for kind in wishes:
        width = {"window": rng.uniform(0.9, 1.8), "door": rng.uniform(0.8, 1.0),
                 "shelf": rng.uniform(0.8, 1.6), "picture": rng.uniform(0.4, 0.9)}[kind]
        for _ in range(6):
            wall = walls[rng.integers(len(walls))]
            lo, hi = spans[wall]
            if hi - lo < width + 0.1:
                continue
            a0 = rng.uniform(lo, hi - width)
            a1 = a0 + width
            if any(a0 < t1 + 0.15 and t0 < a1 + 0.15 for t0, t1 in taken[wall]):
                continue
            taken[wall].append((a0, a1))
            if kind == "window":
                sill = rng.uniform(0.75, 1.0)
                _window(cv, cam, room, wall, a0, a1, sill, min(room.height - 0.25, sill + rng.uniform(1.1, 1.6)),
                        rng)
            elif kind == "door":
                _door(cv, cam, room, wall, a0, a1, rng.uniform(2.0, 2.15), rng)
            elif kind == "shelf":
                _shelf(cv, cam, room, wall, a0, a1, min(room.height - 0.2, rng.uniform(1.2, 2.2)), rng)
            else:
                h0 = rng.uniform(1.3, 1.6)
                _picture(cv, cam, room, wall, a0, a1, h0, h0 + width * rng.uniform(0.6, 1.0), rng)
            break


def _table(cv, cam, x, z, w, d, rng) -> None:
    wood = _pick(rng, _FURNITURE, 0.08)
    top, leg = rng.uniform(0.72, 0.78), 0.05
    x0, x1, z0, z1 = x - w / 2, x + w / 2, z - d / 2, z + d / 2
    for lz in (z1 - leg, z0):
        for lx in (x0 + 0.03, x1 - 0.03 - leg):
            _box(cv, cam, lx, lx + leg, 0.0, top - 0.04, lz, lz + leg, _shade(wood, 0.85), _I_TABLE)
    _box(cv, cam, x0, x1, top - 0.04, top, z0, z1, wood, _I_TABLE)


def _chair(cv, cam, x, z, facing_camera: bool, rng) -> None:
    colour = _pick(rng, _FURNITURE + _FABRIC, 0.08)
    w, seat, leg = rng.uniform(0.42, 0.5), rng.uniform(0.43, 0.48), 0.04
    x0, x1, z0, z1 = x - w / 2, x + w / 2, z - w / 2, z + w / 2
    back_top = seat + rng.uniform(0.4, 0.5)
    if facing_camera:
        _box(cv, cam, x0, x1, seat, back_top, z1 - 0.05, z1, colour, _I_CHAIR)
    for lz in (z1 - leg, z0):
        for lx in (x0, x1 - leg):
            _box(cv, cam, lx, lx + leg, 0.0, seat - 0.05, lz, lz + leg, _shade(colour, 0.7), _I_CHAIR)
    _box(cv, cam, x0, x1, seat - 0.05, seat, z0, z1, colour, _I_CHAIR)
    if not facing_camera:
        _box(cv, cam, x0, x1, seat, back_top, z0, z0 + 0.05, colour, _I_CHAIR)


def _shade_cone(cv, cam, x, z, h_top, h_bottom, r_top, r_bottom, colour) -> None:
    s = cam.scale(z)
    cx, yt = cam.pt(x, h_top, z)
    _, yb = cam.pt(x, h_bottom, z)
    cv.poly([(cx - r_top * s, yt), (cx + r_top * s, yt), (cx + r_bottom * s, yb), (cx - r_bottom * s, yb)], colour,
            _I_LAMP)
    cv.ellipse(cx, yb, r_bottom * s, max(0.8, 0.06 * s), _shade(colour, 1.05), _I_LAMP)


def _floor_lamp(cv, cam, x, z, rng) -> None:
    metal = _pick(rng, [(40, 40, 40), (180, 170, 150), (150, 120, 60)], 0.1)
    top = rng.uniform(1.4, 1.7)
    s = cam.scale(z)
    cx, base = cam.pt(x, 0, z)
    cv.ellipse(cx, base, 0.16 * s, max(1.0, 0.05 * s), metal, _I_LAMP)
    _box(cv, cam, x - 0.015, x + 0.015, 0.0, top - 0.2, z, z + 0.03, metal, _I_LAMP)
    _shade_cone(cv, cam, x, z, top, top - 0.32, rng.uniform(0.1, 0.14), rng.uniform(0.18, 0.24),
                jitter(rng, _LAMPLIGHT, 0.05))


def _pendant(cv, cam, room, x, z, rng) -> None:
    low = rng.uniform(1.9, 2.3)
    _box(cv, cam, x - 0.008, x + 0.008, low, room.height, z, z + 0.01, (40, 40, 40), _I_LAMP)
    r = rng.uniform(0.15, 0.28)
    _shade_cone(cv, cam, x, z, low, low - rng.uniform(0.18, 0.3), r * 0.35, r,
                jitter(rng, _LAMPLIGHT if rng.random() < 0.6 else (60, 60, 62), 0.06))


def _table_lamp(cv, cam, x, z, top, rng) -> None:
    s = cam.scale(z)
    cx, yb = cam.pt(x, top, z)
    cv.ellipse(cx, yb, 0.08 * s, max(0.8, 0.03 * s), (60, 55, 50), _I_LAMP)
    _box(cv, cam, x - 0.012, x + 0.012, top, top + 0.25, z, z + 0.02, (60, 55, 50), _I_LAMP)
    _shade_cone(cv, cam, x, z, top + 0.45, top + 0.22, 0.07, 0.13, jitter(rng, _LAMPLIGHT, 0.05))


def _plan_room(room: _Room, rng: np.random.Generator) -> list:
    """``(z, kind, x, extra)`` for everything standing in the room, far to near."""
    objs: list = []
    lo, hi = room.xl + 0.6, room.xr - 0.6
    for _ in range(int(rng.integers(0, 3)) + int(rng.random() < 0.85)):
        w, d = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0)
        x = rng.uniform(lo + w / 2, max(lo + w / 2, hi - w / 2))
        z = rng.uniform(2.2, max(2.3, room.zb - 1.0))
        objs.append((z, "table", x, (w, d)))
        for _ in range(int(rng.integers(1, 4))):
            where = rng.integers(4)
            if where == 0:  # in front, back to the camera
                objs.append((z - d / 2 - 0.3, "chair", x + rng.uniform(-w / 3, w / 3), False))
            elif where == 1:  # behind, facing the camera
                objs.append((z + d / 2 + 0.3, "chair", x + rng.uniform(-w / 3, w / 3), True))
            else:
                side = -1 if where == 2 else 1
                objs.append((z + rng.uniform(-0.1, 0.1), "chair", x + side * (w / 2 + 0.3), rng.random() < 0.5))
        if rng.random() < 0.5:
            objs.append((z, "pendant", x, None))
        elif rng.random() < 0.3:
            objs.append((z + 0.01, "table lamp", x + rng.uniform(-w / 3, w / 3), None))
    for _ in range(int(rng.integers(0, 3))):
        objs.append((rng.uniform(2.0, room.zb - 0.5), "chair", rng.uniform(lo, hi), rng.random() < 0.6))
    for _ in range(int(rng.random() < 0.55) + int(rng.random() < 0.25)):
        objs.append((rng.uniform(2.0, room.zb - 0.4), "floor lamp", rng.uniform(lo, hi), None))
    for _ in range(int(rng.random() < 0.6) + int(rng.random() < 0.3)):
        objs.append((rng.uniform(2.2, room.zb - 0.3), "person", rng.uniform(lo, hi), None))
    objs.sort(key=lambda o: -o[0])
    return objs


def render_indoor(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A room: walls with windows, doors and bookcases; tables, chairs, lamps and people."""
    s = 2 * size
    cam = Camera(f=s * rng.uniform(0.5, 0.72), hc=rng.uniform(1.25, 1.7), vx=s * rng.uniform(0.3, 0.7),
                 hy=s * rng.uniform(0.3, 0.46))
    room = _Room(xl=-rng.uniform(2.0, 4.5), xr=rng.uniform(2.0, 4.5), height=rng.uniform(2.6, 3.3),
                 zb=rng.uniform(5.0, 10.0))
    cv = Canvas(s, background=_I_WALL)
    _room_shell(cv, cam, room, rng)
    _wall_items(cv, cam, room, rng, s)
    for z, kind, x, extra in _plan_room(room, rng):
        if kind == "table":
            _table(cv, cam, x, z, extra[0], extra[1], rng)
        elif kind == "chair":
            _chair(cv, cam, x, z, extra, rng)
        elif kind == "pendant":
            _pendant(cv, cam, room, x, z, rng)
        elif kind == "table lamp":
            _table_lamp(cv, cam, x, z, 0.76, rng)
        elif kind == "floor lamp":
            _floor_lamp(cv, cam, x, z, rng)
        else:
            person(cv, cam, x, z, rng, _I_PERSON)
    mask, rgb = cv.arrays()
    rgb = np.clip(texture(rgb, mask, rng, *_I_TEXTURE), 0.0, 1.0)
    return downsample(rgb, mask, size)


# --------------------------------------------------------------------------------------
# Harbour: water, a quay with warehouses, boats, a far shore
# --------------------------------------------------------------------------------------

HARBOUR_CLASSES: tuple[str, ...] = (
    "sky", "water", "boat", "pier", "building", "vegetation", "person", "pole",
)
_H_SKY, _H_WATER, _H_BOAT, _H_PIER, _H_BUILDING, _H_VEG, _H_PERSON, _H_POLE = range(8)
_H_TEXTURE = _texture_table([
    (0.01, 0.0, 0.0), (0.02, 0.0, 0.0), (0.03, 0.0, 0.03), (0.06, 0.05, 0.1),
    (0.04, 0.05, 0.12), (0.1, 0.25, 0.1), (0.03, 0.0, 0.0), (0.04, 0.0, 0.04),
])
_HOUSE_COLOURS = [(200, 60, 50), (230, 190, 80), (70, 120, 170), (235, 232, 222), (180, 120, 80),
                  (90, 150, 120), (210, 140, 60), (150, 150, 150)]
_HULL_COLOURS = [(236, 236, 232), (200, 40, 35), (30, 60, 130), (40, 110, 70), (30, 30, 35), (220, 180, 40)]
_WATER_COLOURS = [(40, 92, 122), (38, 80, 92), (55, 105, 110), (30, 65, 100)]


def _silhouette(cv: Canvas, cam: Camera, z: float, lo: float, hi: float, colour: tuple, cls: int,
                rng: np.random.Generator) -> None:
    """A bumpy band standing on the horizon at depth ``z`` (hills, a tree line) with heights in [lo, hi] m."""
    x0, x1 = -cam.vx / cam.scale(z) - 10, (cv.size - cam.vx) / cam.scale(z) + 10
    xs = np.linspace(x0, x1, 48)
    phase, waves = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.5, 3.0, 3) * 2 * np.pi / (x1 - x0)
    bumps = sum(np.sin(xs * k + p) * a for k, p, a in zip(waves, phase, (1.0, 0.5, 0.25)))
    heights = lo + (hi - lo) * (bumps - bumps.min()) / max(float(np.ptp(bumps)), 1e-6)
    pts = [cam.pt(x, h, z) for x, h in zip(xs, heights)] + [cam.pt(x1, 0, z), cam.pt(x0, 0, z)]
    cv.poly(pts, colour, cls)


def _boat(cv: Canvas, cam: Camera, x: float, z: float, length: float, rng: np.random.Generator,
          water: tuple) -> None:
    """A boat seen broadside, with its reflection on the water (appearance only)."""
    way = 1 if rng.random() < 0.5 else -1
    deck = rng.uniform(0.9, 1.6) * (length / 9.0) ** 0.5
    stern, bow = x - way * length / 2, x + way * length / 2
    keel_bow = bow - way * length * rng.uniform(0.1, 0.22)
    hull = _pick(rng, _HULL_COLOURS, 0.08)
    shape = [(stern, 0.0), (keel_bow, 0.0), (bow, deck), (stern, deck)]
    reflection = tuple(int(0.55 * w + 0.45 * c * 0.6) for w, c in zip(water, hull))
    cv.poly([cam.pt(a, -h * 0.8, z) for a, h in shape], reflection, None)
    cv.poly([cam.pt(a, h, z) for a, h in shape], hull, _H_BOAT)
    stripe = _pick(rng, _HULL_COLOURS, 0.1)
    cv.poly([cam.pt(stern, deck * 0.75, z), cam.pt(bow - way * 0.1, deck * 0.75, z), cam.pt(bow, deck, z),
             cam.pt(stern, deck, z)], stripe, _H_BOAT)
    c0 = stern + way * length * rng.uniform(0.12, 0.25)
    c1 = c0 + way * length * rng.uniform(0.25, 0.4)
    top = deck + rng.uniform(1.0, 1.8) * (length / 9.0) ** 0.5
    a0, a1 = sorted((c0, c1))
    cabin = jitter(rng, (236, 236, 232), 0.05) if rng.random() < 0.7 else _shade(hull, 0.9)
    cv.poly([cam.pt(a0, deck, z), cam.pt(a1, deck, z), cam.pt(a1, top, z), cam.pt(a0, top, z)], cabin, _H_BOAT)
    glass = jitter(rng, (45, 55, 70), 0.15)
    cv.poly([cam.pt(a0 + 0.15, top - 0.55 * (top - deck), z), cam.pt(a1 - 0.15, top - 0.55 * (top - deck), z),
             cam.pt(a1 - 0.15, top - 0.2 * (top - deck), z), cam.pt(a0 + 0.15, top - 0.2 * (top - deck), z)],
            glass, _H_BOAT)
    if rng.random() < 0.45:  # a mast, and a sail on sailing boats
        mast_x = x + way * length * rng.uniform(0.0, 0.15)
        mast_top = deck + length * rng.uniform(0.8, 1.2)
        s = cam.scale(z)
        mx, my = cam.pt(mast_x, mast_top, z)
        _, mb = cam.pt(mast_x, deck, z)
        hw = max(0.8, 0.06 * s)
        cv.rect(mx - hw, my, mx + hw, mb, (200, 200, 200), _H_BOAT)
        if rng.random() < 0.6:
            boom = deck + 0.8
            cv.poly([cam.pt(mast_x, mast_top * 0.97, z), cam.pt(mast_x, boom, z),
                     cam.pt(mast_x - way * length * rng.uniform(0.3, 0.45), boom, z)],
                    jitter(rng, (240, 238, 230), 0.04), _H_BOAT)


def _quay_facades(cv: Canvas, cam: Camera, xw: float, z_end: float, ground: float,
                  rng: np.random.Generator) -> None:
    """Warehouses and harbour houses along the quay, a wall at ``x = xw`` facing the water."""
    segments, z = [], NEAR
    while z < z_end:
        length = rng.uniform(8.0, 30.0)
        if rng.random() < 0.85:
            segments.append((z, min(z + length, z_end), rng.uniform(6.0, 18.0)))
        z += length
    for z0, z1, hb in reversed(segments):
        colour = _pick(rng, _HOUSE_COLOURS + BUILDING_COLOURS[:4], 0.12)
        cv.poly([cam.pt(xw, ground, z0), cam.pt(xw, ground, z1), cam.pt(xw, ground + hb, z1),
                 cam.pt(xw, ground + hb, z0)], colour, _H_BUILDING)
        if rng.random() < 0.5:  # a big loading door (appearance only)
            a = rng.uniform(1.0, max(1.5, z1 - z0 - 5.0))
            door = _shade(colour, 0.55)
            cv.poly([cam.pt(xw, ground, z0 + a), cam.pt(xw, ground, z0 + a + 3.5),
                     cam.pt(xw, ground + 4.0, z0 + a + 3.5), cam.pt(xw, ground + 4.0, z0 + a)], door, _H_BUILDING)

        def corners(a0, a1, u0, u1, z0=z0):
            return [cam.pt(xw, ground + u0, z0 + a0), cam.pt(xw, ground + u0, z0 + a1),
                    cam.pt(xw, ground + u1, z0 + a1), cam.pt(xw, ground + u1, z0 + a0)]

        draw_windows(cv, cam, corners, z1 - z0, hb, rng, min_px=2.0)


def _far_shore(cv: Canvas, cam: Camera, rng: np.random.Generator) -> None:
    z = rng.uniform(70.0, 220.0)
    if rng.random() < 0.8:
        green = jitter(rng, (70, 105, 75), 0.15)
        _silhouette(cv, cam, z + rng.uniform(150.0, 500.0), 10.0, rng.uniform(40.0, 140.0), green, _H_VEG, rng)
    if rng.random() < 0.85:
        x = -cam.vx / cam.scale(z) - rng.uniform(0, 10)
        x_max = (cv.size - cam.vx) / cam.scale(z)
        while x < x_max:
            width = rng.uniform(6.0, 20.0)
            if rng.random() < 0.85:
                hb = rng.uniform(5.0, 16.0)
                colour = _pick(rng, _HOUSE_COLOURS, 0.12)
                cv.poly([cam.pt(x, 0, z), cam.pt(x + width, 0, z), cam.pt(x + width, hb, z), cam.pt(x, hb, z)],
                        colour, _H_BUILDING)
                if rng.random() < 0.6:  # gable roof
                    cv.poly([cam.pt(x - 0.5, hb, z), cam.pt(x + width + 0.5, hb, z),
                             cam.pt(x + width / 2, hb + width * 0.35, z)],
                            _pick(rng, [(150, 60, 45), (70, 70, 75), (110, 60, 50)], 0.1), _H_BUILDING)
            x += width


def _water_surface(rgb: np.ndarray, mask: np.ndarray, hy: float, rng: np.random.Generator) -> np.ndarray:
    """Horizontal ripples and a sky-coloured sheen toward the horizon on water pixels."""
    s = mask.shape[0]
    rows = np.clip((np.arange(s, dtype=np.float32) - hy) / max(s - hy, 1.0), 0, 1)[:, None, None]
    small = rng.standard_normal((max(4, s // 3), 6)).astype(np.float32)
    ripples = np.asarray(Image.fromarray(small).resize((s, s), Image.BICUBIC), np.float32)[..., None]
    sheen = np.array([0.75, 0.82, 0.88], np.float32) * rng.uniform(0.9, 1.05)
    water = rgb * (1.0 + 0.1 * ripples)
    water = water * (0.45 + 0.55 * rows) + sheen * (0.55 - 0.55 * rows)
    return np.where((mask == _H_WATER)[..., None], water, rgb)


def render_harbour(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A harbour: boats on the water beside a quay lined with warehouses, hills across the water."""
    s = 2 * size
    side = 1 if rng.random() < 0.5 else -1  # the quay's side
    on_quay = rng.random() < 0.6
    deck = rng.uniform(0.8, 1.6)
    cam = Camera(f=s * rng.uniform(0.6, 0.9), hc=(deck if on_quay else 0.0) + rng.uniform(1.5, 3.0),
                 vx=s * rng.uniform(0.35, 0.65), hy=s * rng.uniform(0.3, 0.45))
    edge = side * (-rng.uniform(0.5, 3.0) if on_quay else rng.uniform(3.0, 12.0))  # quay's water edge
    wall = edge + side * rng.uniform(8.0, 25.0)
    z_end = rng.uniform(60.0, 250.0)
    cv = Canvas(s, background=_H_SKY)
    water = _pick(rng, _WATER_COLOURS, 0.1)
    cv.poly(ground_quad(cam, -4000, 4000, NEAR, FAR), water, _H_WATER)
    _far_shore(cv, cam, rng)
    stone = jitter(rng, (150, 146, 138) if rng.random() < 0.6 else (130, 100, 70), 0.1)
    x_far = side * 4000
    if not on_quay:  # the quay wall faces the camera
        cv.poly([cam.pt(edge, 0, NEAR), cam.pt(edge, 0, z_end), cam.pt(edge, deck, z_end), cam.pt(edge, deck, NEAR)],
                _shade(stone, 0.7), _H_PIER)
    cv.poly([cam.pt(edge, deck, NEAR), cam.pt(x_far, deck, NEAR), cam.pt(x_far, deck, z_end),
             cam.pt(edge, deck, z_end)], stone, _H_PIER)
    kerb = _shade(stone, 1.15)
    cv.poly([cam.pt(edge, deck, NEAR), cam.pt(edge + side * 0.3, deck, NEAR), cam.pt(edge + side * 0.3, deck, z_end),
             cam.pt(edge, deck, z_end)], kerb, _H_PIER)
    if rng.random() < 0.85:
        _quay_facades(cv, cam, wall, z_end, deck, rng)
    objs: list = []
    if rng.random() < 0.45:  # a jetty reaching into the water
        width = rng.uniform(2.0, 4.0)
        x0 = edge - side * rng.uniform(4.0, 25.0)
        z0 = rng.uniform(6.0, 20.0)
        objs.append((z0, "jetty", x0, (width, z0 + rng.uniform(15.0, 50.0), rng.uniform(0.4, 0.9))))
    for _ in range(int(rng.integers(1, 6))):
        z = rng.uniform(6.0, 60.0)
        length = rng.uniform(5.0, 14.0)
        px = rng.uniform(0.05, 0.95) * s
        x = (px - cam.vx) / cam.scale(z)
        if side * (x - edge) > -(length / 2 + 1.0):  # not on the quay
            x = edge - side * (length / 2 + rng.uniform(1.0, 4.0))
        objs.append((z, "boat", x, length))
    for _ in range(int(rng.integers(0, 4))):
        x = edge + side * rng.uniform(0.8, max(1.0, abs(wall - edge) - 1.0))
        objs.append((rng.uniform(3.0, 25.0), "person", x, deck))
    for _ in range(int(rng.integers(0, 4))):
        objs.append((rng.uniform(4.0, 60.0), "pole", edge + side * 0.6, deck))
    objs.sort(key=lambda o: -o[0])
    for z, kind, x, extra in objs:
        if kind == "boat":
            _boat(cv, cam, x, z, extra, rng, water)
        elif kind == "jetty":
            width, z1, top = extra
            wood = jitter(rng, (130, 100, 70), 0.12)
            for pz in np.arange(z, z1, 3.0):  # piles
                for px in (x, x + width - 0.25):
                    _box(cv, cam, px, px + 0.25, 0.0, top, pz, pz + 0.25, _shade(wood, 0.6), _H_PIER)
            _box(cv, cam, x, x + width, top - 0.2, top, z, z1, wood, _H_PIER)
        elif kind == "person":
            person(cv, cam, x, z, rng, _H_PERSON, ground=extra)
        else:
            pole(cv, cam, x, z, side, rng, _H_POLE, ground=extra)
    mask, rgb = cv.arrays()
    rgb = np.where((mask == _H_SKY)[..., None], sky_image(rng, s, cam.hy), rgb)
    rgb = _water_surface(rgb, mask, cam.hy, rng)
    rgb = np.clip(texture(rgb, mask, rng, *_H_TEXTURE), 0.0, 1.0)
    return downsample(rgb, mask, size)


# --------------------------------------------------------------------------------------
# Fields: open country with crop fields, a road, fences, animals and farm buildings
# --------------------------------------------------------------------------------------

FIELDS_CLASSES: tuple[str, ...] = (
    "sky", "field", "vegetation", "road", "fence", "animal", "building", "person",
)
_F_SKY, _F_FIELD, _F_VEG, _F_ROAD, _F_FENCE, _F_ANIMAL, _F_BUILDING, _F_PERSON = range(8)
_F_TEXTURE = _texture_table([
    (0.01, 0.0, 0.0), (0.08, 0.12, 0.12), (0.1, 0.18, 0.1), (0.07, 0.04, 0.1),
    (0.05, 0.0, 0.04), (0.03, 0.0, 0.0), (0.04, 0.05, 0.1), (0.03, 0.0, 0.0),
])
_CROPS = [(214, 186, 96), (196, 160, 80), (118, 86, 58), (92, 70, 50), (120, 160, 60), (150, 182, 82),
          (226, 206, 52), (190, 170, 120)]
_FARM_WALLS = [(150, 45, 35), (226, 220, 206), (150, 140, 125), (120, 85, 60)]
_ROOFS = [(70, 60, 55), (150, 70, 50), (120, 125, 130)]


def _road_edges(x0: float, slope: float, bend: float, width: float, zs: np.ndarray) -> tuple:
    centre = x0 + slope * zs + bend * zs * zs
    return centre - width / 2, centre + width / 2


def _parcels(cv: Canvas, cam: Camera, rng: np.random.Generator) -> None:
    """Crop fields on a grid of parcels; meadow (vegetation) shows between and around them."""
    z = rng.uniform(0.6, 3.0)
    while z < 900.0:
        depth = rng.uniform(12.0, 60.0) * (1.0 + z / 120.0)
        x = -rng.uniform(0.0, 60.0) - 600.0
        while x < 600.0:
            width = rng.uniform(20.0, 110.0)
            if rng.random() < 0.65:
                colour = _pick(rng, _CROPS, 0.08)
                x0, x1, z0, z1 = x + 0.6, x + width - 0.6, z + 0.4, z + depth - 0.4
                cv.poly(ground_quad(cam, x0, x1, z0, z1), colour, _F_FIELD)
                if z0 < 60.0 and rng.random() < 0.7:  # crop rows or furrows (appearance only)
                    step = rng.uniform(0.6, 1.4)
                    row = _shade(colour, rng.uniform(0.75, 0.88))
                    lo = max(x0, -z1 * cam.vx / cam.f - 2.0)
                    hi = min(x1, z1 * (cv.size - cam.vx) / cam.f + 2.0)
                    for rx in np.arange(lo, hi, step):
                        cv.poly(ground_quad(cam, rx, rx + step * 0.35, z0, z1), row, _F_FIELD)
            x += width
        z += depth


def _fence(posts: list[tuple[float, float]], rng: np.random.Generator) -> list:
    """Objects for a post-and-rail fence through ``posts`` [(x, z)]: each post and each span."""
    colour = _pick(rng, [(130, 95, 60), (150, 150, 145), (232, 230, 224), (95, 70, 45)], 0.08)
    spans = [(max(za, zb), "rails", (xa, za, xb, zb), colour) for (xa, za), (xb, zb) in zip(posts, posts[1:])]
    return spans + [(z, "post", (x, z), colour) for x, z in posts]


def _fence_part(cv: Canvas, cam: Camera, kind: str, where: tuple, colour: tuple) -> None:
    if kind == "post":
        x, z = where
        cx, base = cam.pt(x, 0, z)
        _, top = cam.pt(x, 1.15, z)
        hw = max(1.0, 0.06 * cam.scale(z))
        cv.rect(cx - hw, top, cx + hw, base, colour, _F_FENCE)
        return
    xa, za, xb, zb = where
    for h in (0.45, 0.95):
        ta, tb = max(0.08, 1.2 / cam.scale(za)), max(0.08, 1.2 / cam.scale(zb))  # >= 1.2 px thick
        cv.poly([cam.pt(xa, h, za), cam.pt(xb, h, zb), cam.pt(xb, h + tb, zb), cam.pt(xa, h + ta, za)], colour,
                _F_FENCE)


def _animal(cv: Canvas, cam: Camera, x: float, z: float, kind: str, rng: np.random.Generator) -> None:
    """A cow or a sheep seen from the side."""
    way = 1 if rng.random() < 0.5 else -1
    if kind == "cow":
        length, belly, back = rng.uniform(2.0, 2.4), rng.uniform(0.7, 0.8), rng.uniform(1.35, 1.5)
        coat = _pick(rng, [(35, 33, 32), (130, 80, 45), (222, 212, 192), (90, 55, 35)], 0.08)
        head_colour, patches = coat, rng.random() < 0.5
    else:
        length, belly, back = rng.uniform(1.1, 1.4), rng.uniform(0.4, 0.45), rng.uniform(0.9, 1.0)
        coat = jitter(rng, (226, 221, 206), 0.05)
        head_colour, patches = jitter(rng, (45, 40, 36), 0.1), False
    s = cam.scale(z)
    legs = _shade(head_colour, 0.85)
    leg_w = max(0.6, 0.06 * length * s)
    for off in (-0.38, -0.28, 0.28, 0.38):
        lx, ly = cam.pt(x + off * length, 0, z)
        _, top = cam.pt(x, belly + 0.1, z)
        cv.rect(lx - leg_w, top, lx + leg_w, ly, legs, _F_ANIMAL)
    cx, cy = cam.pt(x, (belly + back) / 2, z)
    rx, ry = length / 2 * s, (back - belly) / 2 * s
    cv.ellipse(cx, cy, rx, ry, coat, _F_ANIMAL)
    if patches:  # black-and-white coat
        for _ in range(int(rng.integers(2, 5))):
            px, py = cx + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.5, 0.5) * ry
            cv.ellipse(px, py, rx * rng.uniform(0.15, 0.3), ry * rng.uniform(0.3, 0.6),
                       (235, 232, 225) if coat[0] < 100 else (30, 30, 30), _F_ANIMAL)
    hx, hy = cam.pt(x + way * length * 0.55, back - (0.15 if kind == "cow" else 0.05), z)
    hr = (0.26 if kind == "cow" else 0.17) * s
    cv.ellipse(hx, hy, hr * 1.2, hr * 0.8, head_colour, _F_ANIMAL)
    nx, ny = cam.pt(x + way * length * 0.48, back - 0.05, z)
    cv.ellipse(nx, ny, hr, hr * 0.9, head_colour, _F_ANIMAL)


def _farm_building(cv: Canvas, cam: Camera, x: float, z: float, rng: np.random.Generator) -> None:
    """A barn or farmhouse: a box with a gable roof whose ridge runs across the view."""
    width, depth, wall = rng.uniform(8.0, 20.0), rng.uniform(6.0, 12.0), rng.uniform(3.5, 7.0)
    colour, roof = _pick(rng, _FARM_WALLS, 0.08), _pick(rng, _ROOFS, 0.1)
    x0, x1, z1 = x - width / 2, x + width / 2, z + depth
    ridge, zm = wall + depth * rng.uniform(0.3, 0.5), z + depth / 2
    _box(cv, cam, x0, x1, 0.0, wall, z, z1, colour, _F_BUILDING)
    gable_x = x1 if x1 < 0 else (x0 if x0 > 0 else None)
    if gable_x is not None:
        cv.poly([cam.pt(gable_x, wall, z), cam.pt(gable_x, wall, z1), cam.pt(gable_x, ridge, zm)],
                _shade(colour, 0.78), _F_BUILDING)
    cv.poly([cam.pt(x0 - 0.3, wall, z - 0.3), cam.pt(x1 + 0.3, wall, z - 0.3), cam.pt(x1 + 0.3, ridge, zm),
             cam.pt(x0 - 0.3, ridge, zm)], roof, _F_BUILDING)
    door = _shade(colour, 0.55)
    dx = x + rng.uniform(-0.3, 0.3) * width
    cv.poly([cam.pt(dx - 1.2, 0, z), cam.pt(dx + 1.2, 0, z), cam.pt(dx + 1.2, min(wall - 0.5, 3.0), z),
             cam.pt(dx - 1.2, min(wall - 0.5, 3.0), z)], door, _F_BUILDING)


def render_fields(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Open country: crop fields and meadows, a country road, fences, grazing animals, farms."""
    s = 2 * size
    cam = Camera(f=s * rng.uniform(0.6, 0.95), hc=rng.uniform(1.5, 2.6), vx=s * rng.uniform(0.35, 0.65),
                 hy=s * rng.uniform(0.3, 0.45))
    cv = Canvas(s, background=_F_SKY)
    cv.poly(ground_quad(cam, -4000, 4000, NEAR, FAR), jitter(rng, (95, 140, 55), 0.15), _F_VEG)
    if rng.random() < 0.85:  # a distant tree line or hills
        _silhouette(cv, cam, rng.uniform(500.0, 1200.0), 4.0, rng.uniform(12.0, 45.0),
                    jitter(rng, (60, 95, 60), 0.15), _F_VEG, rng)
    _parcels(cv, cam, rng)
    has_road = rng.random() < 0.8
    x0, slope, bend, width = rng.uniform(-5.0, 5.0), rng.uniform(-0.15, 0.15), rng.uniform(-4e-4, 4e-4), \
        rng.uniform(3.0, 6.0)
    if has_road:
        zs = NEAR * 1.12 ** np.arange(80)
        zs = zs[zs < 1500.0]
        for extra, colour, cls in ((1.5, jitter(rng, (95, 140, 55), 0.15), _F_VEG),
                                   (0.0, _pick(rng, [(100, 100, 102), (150, 124, 90), (165, 160, 150)], 0.08),
                                    _F_ROAD)):
            left, right = _road_edges(x0, slope, bend, width + 2 * extra, zs)
            cv.poly([cam.pt(a, 0, b) for a, b in zip(left, zs)] + [cam.pt(a, 0, b) for a, b in
                                                                   zip(right[::-1], zs[::-1])], colour, cls)
    objs: list = []
    if rng.random() < 0.8:
        step = rng.uniform(2.2, 3.2)
        if has_road and rng.random() < 0.6:  # along the road
            off = rng.choice([-1.0, 1.0]) * (width / 2 + rng.uniform(1.2, 3.0))
            zs = np.arange(rng.uniform(2.0, 5.0), rng.uniform(30.0, 120.0), step)
            centre, _ = _road_edges(x0, slope, bend, 0.0, zs)
            objs += _fence([(c + off, z) for c, z in zip(centre, zs)], rng)
        else:  # across the view
            z = rng.uniform(6.0, 30.0)
            xs = np.arange(-z * cam.vx / cam.f - 2.0, z * (s - cam.vx) / cam.f + 2.0, step)
            objs += _fence([(x, z + 0.02 * i) for i, x in enumerate(xs)], rng)
    clear = width / 2 + 2.0

    def off_road(x: float, z: float) -> float:
        c, _ = _road_edges(x0, slope, bend, 0.0, np.array([z]))
        if has_road and abs(x - float(c[0])) < clear:
            return float(c[0]) + (clear + rng.uniform(0.5, 4.0)) * (1 if x > c[0] else -1)
        return x

    def in_view(z: float, margin: float = 0.1) -> float:
        return (rng.uniform(margin, 1 - margin) * s - cam.vx) / cam.scale(z)

    if rng.random() < 0.8:  # a herd
        kind = "cow" if rng.random() < 0.55 else "sheep"
        z = rng.uniform(6.0, 30.0)
        x = in_view(z, 0.2)
        for _ in range(int(rng.integers(1, 7))):
            az = max(4.0, z + rng.uniform(-4.0, 6.0))
            objs.append((az, kind, off_road(x + rng.uniform(-6.0, 6.0), az), None))
    for _ in range(int(rng.integers(0, 7))):
        z = rng.uniform(8.0, 150.0)
        objs.append((z, "tree" if rng.random() < 0.7 else "bush", off_road(in_view(z, 0.0), z), None))
    if rng.random() < 0.65:
        for _ in range(int(rng.integers(1, 3))):
            z = rng.uniform(30.0, 200.0)
            objs.append((z, "building", off_road(in_view(z, 0.15), z + 8.0), None))
    for _ in range(int(rng.random() < 0.45) + int(rng.random() < 0.2)):
        z = rng.uniform(4.0, 30.0)
        x = in_view(z, 0.15)
        objs.append((z, "person", x, None))
    objs.sort(key=lambda o: -o[0])
    for z, kind, x, extra in objs:  # for fence parts, x is where the part stands
        if kind in ("cow", "sheep"):
            _animal(cv, cam, x, z, kind, rng)
        elif kind == "tree":
            tree(cv, cam, x, z, rng, _F_VEG)
        elif kind == "bush":
            bush(cv, cam, x, z, rng, _F_VEG)
        elif kind == "building":
            _farm_building(cv, cam, x, z, rng)
        elif kind == "person":
            person(cv, cam, x, z, rng, _F_PERSON)
        else:
            _fence_part(cv, cam, kind, x, extra)
    mask, rgb = cv.arrays()
    rgb = np.where((mask == _F_SKY)[..., None], sky_image(rng, s, cam.hy), rgb)
    rgb = np.clip(texture(rgb, mask, rng, *_F_TEXTURE), 0.0, 1.0)
    return downsample(rgb, mask, size)
