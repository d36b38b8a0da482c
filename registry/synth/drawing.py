"""Drawing primitives shared by the synthetic scenes of :mod:`semla.registry.synth`.

Every scene paints colours and class ids in lockstep on a :class:`Canvas` seen through a
pinhole :class:`Camera`; the figures (people, trees, cars, ...) take the class id to paint,
so one figure serves every scene that has its class. Each function draws from the ``rng`` it
is given in a fixed order: changing that order changes every rendered image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "NEAR", "FAR", "BUILDING_COLOURS", "CAR_COLOURS", "CLOTHES", "SKIN",
    "smooth_noise", "box_blur", "luma", "jitter", "to_uint8", "glow", "texture",
    "Camera", "Canvas", "downsample", "ground_quad", "sky_image", "draw_windows",
    "tree", "bush", "pole", "person", "car",
]

NEAR = 1.0  # metres; projects well below the image
FAR = 2000.0  # metres; projects to (almost) the horizon

BUILDING_COLOURS = [
    (190, 170, 140), (170, 90, 70), (150, 150, 150), (215, 205, 190), (120, 110, 100),
    (200, 180, 120), (140, 160, 170), (180, 130, 120), (100, 100, 110), (225, 215, 170),
]
CAR_COLOURS = [
    (200, 30, 30), (30, 60, 160), (230, 230, 230), (25, 25, 30), (150, 150, 155),
    (40, 120, 60), (220, 180, 40), (120, 30, 40), (90, 110, 130), (200, 100, 30),
]
CLOTHES = [
    (200, 40, 40), (40, 70, 170), (240, 240, 240), (30, 30, 35), (60, 140, 70),
    (230, 190, 40), (150, 60, 150), (110, 80, 60), (240, 120, 40), (100, 160, 200),
]
SKIN = [(240, 200, 170), (200, 150, 110), (150, 100, 70), (100, 70, 50)]


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Roughly unit-variance value noise with about ``cells`` features per side."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small)  # mode "F"
    out = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32)
    std = float(out.std())
    return out / std if std > 0 else out


def box_blur(rgb: np.ndarray, radius: int = 1) -> np.ndarray:
    """Separable box blur with edge padding."""
    if radius <= 0:
        return rgb
    k = 2 * radius + 1
    pad = np.pad(rgb, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    c = np.cumsum(pad, axis=0, dtype=np.float32)
    c = np.concatenate([np.zeros_like(c[:1]), c], axis=0)
    rows = (c[k:] - c[:-k]) / k
    c = np.cumsum(rows, axis=1, dtype=np.float32)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: float) -> tuple:
    """Perturb a 0-255 colour by a shared brightness factor and per-channel noise."""
    b = np.asarray(base, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount)
    b = b + rng.normal(0.0, 255 * amount * 0.35, 3)
    return tuple(int(v) for v in np.clip(b, 0, 255))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def glow(h: int, w: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    yy = (np.arange(h, dtype=np.float32) - cy) ** 2
    xx = (np.arange(w, dtype=np.float32) - cx) ** 2
    return np.exp(-(yy[:, None] + xx[None, :]) / (2 * sigma * sigma))


def texture(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fine: np.ndarray,
            mid: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Per-class surface texture and uneven light on a square ``(s, s, 3)`` image.

    ``fine``, ``mid`` and ``low`` hold one amplitude per class id: pixel grain, blotchy
    (leafy) noise and slow weathering.
    """
    s = mask.shape[0]
    grain = rng.standard_normal((s, s)).astype(np.float32)
    blotch = smooth_noise(rng, s, s, s // 5)
    weather = smooth_noise(rng, s, s, 5)
    mod = 1.0 + fine[mask] * grain + mid[mask] * blotch + low[mask] * weather
    light = 1.0 + 0.08 * smooth_noise(rng, s, s, 3)  # uneven illumination
    return rgb * (mod * light * rng.uniform(0.85, 1.1))[..., None]


@dataclass(frozen=True)
class Camera:
    """Pinhole camera looking along +Z at height ``hc`` metres; the ground is ``h = 0``."""

    f: float
    hc: float
    vx: float
    hy: float

    def pt(self, x: float, h: float, z: float) -> tuple[float, float]:
        return (self.vx + self.f * x / z, self.hy + self.f * (self.hc - h) / z)

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.f / z


class Canvas:
    """Paints class ids into a mask and colours into an RGB image in lockstep."""

    def __init__(self, size: int, background: int = 0) -> None:
        self.size = size
        self.rgb = Image.new("RGB", (size, size), (0, 0, 0))
        self.mask = Image.new("L", (size, size), background)
        self._dr = ImageDraw.Draw(self.rgb)
        self._dm = ImageDraw.Draw(self.mask)

    def poly(self, pts, colour, cls: int | None) -> None:
        self._dr.polygon(pts, fill=colour)
        if cls is not None:
            self._dm.polygon(pts, fill=cls)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour, cls: int | None) -> None:
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        self._dr.ellipse(box, fill=colour)
        if cls is not None:
            self._dm.ellipse(box, fill=cls)

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour, cls: int | None) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour, cls)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, rgb)``: uint8 ``(s, s)`` class ids and float32 ``(s, s, 3)`` in [0, 1]."""
        mask = np.asarray(self.mask, dtype=np.uint8)
        return mask, np.asarray(self.rgb, dtype=np.float32) / 255.0


def downsample(rgb: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """From a 2x supersampled canvas to ``size``: box-filtered rgb, nearest mask."""
    rgb = rgb.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return rgb.astype(np.float32), np.ascontiguousarray(mask[1::2, 1::2])


def ground_quad(cam: Camera, x0: float, x1: float, z0: float, z1: float) -> list:
    return [cam.pt(x0, 0, z0), cam.pt(x1, 0, z0), cam.pt(x1, 0, z1), cam.pt(x0, 0, z1)]


def sky_image(rng: np.random.Generator, s: int, hy: float) -> np.ndarray:
    """Vertical gradient with soft clouds, float32 (s, s, 3)."""
    if rng.random() < 0.25:  # overcast
        top = np.array([0.6, 0.63, 0.68]) * rng.uniform(0.85, 1.1)
        bottom = np.array([0.82, 0.84, 0.86]) * rng.uniform(0.9, 1.1)
    else:
        top = np.array([rng.uniform(0.2, 0.45), rng.uniform(0.4, 0.62), rng.uniform(0.75, 0.95)])
        bottom = np.array([rng.uniform(0.65, 0.85), rng.uniform(0.78, 0.9), rng.uniform(0.88, 1.0)])
    t = np.clip(np.arange(s, dtype=np.float32) / max(hy, 1.0), 0, 1)[:, None, None]
    sky = (top * (1 - t) + bottom * t).astype(np.float32) * np.ones((1, s, 1), np.float32)
    clouds = smooth_noise(rng, s, s, rng.integers(3, 7))
    cover = np.clip(clouds - rng.uniform(0.2, 1.2), 0, 1)[..., None] * rng.uniform(0.4, 0.9)
    return sky * (1 - cover) + 0.95 * cover


def draw_windows(
    cv: Canvas, cam: Camera, corners: Callable[[float, float, float, float], list],
    length: float, height: float, rng: np.random.Generator, min_px: float,
) -> None:
    """Window grid on a wall parametrised by (along, up) in metres."""
    glass = jitter(rng, (60, 75, 95) if rng.random() < 0.7 else (170, 190, 210), 0.2)
    spacing, floor = rng.uniform(2.2, 3.6), rng.uniform(2.8, 3.4)
    w, h = spacing * rng.uniform(0.35, 0.6), floor * rng.uniform(0.35, 0.55)
    for a in np.arange(spacing * 0.5, length - w, spacing):
        for u in np.arange(floor * 0.45, height - h - 0.3, floor):
            pts = corners(a, a + w, u, u + h)
            ys = [p[1] for p in pts]
            if max(ys) - min(ys) < min_px:
                continue
            cv.poly(pts, glass, None)


def tree(cv: Canvas, cam: Camera, x: float, z: float, rng: np.random.Generator,
         cls: int) -> None:
    s = cam.scale(z)
    trunk_h, crown_r = rng.uniform(1.5, 3.0), rng.uniform(1.2, 2.8)
    bark = jitter(rng, (90, 70, 50), 0.2)
    cx, base = cam.pt(x, 0, z)
    tw = max(1.0, 0.15 * s)
    cv.rect(cx - tw, base - trunk_h * s - crown_r * s * 0.5, cx + tw, base, bark, cls)
    green = (rng.uniform(40, 110), rng.uniform(100, 160), rng.uniform(30, 70))
    _, cy = cam.pt(x, trunk_h + crown_r, z)
    for _ in range(int(rng.integers(4, 8))):
        ox, oy = rng.normal(0, 0.5, 2) * crown_r * s
        r = crown_r * s * rng.uniform(0.5, 0.85)
        cv.ellipse(cx + ox, cy + oy, r, r * rng.uniform(0.8, 1.1),
                   jitter(rng, tuple(int(g) for g in green), 0.2), cls)


def bush(cv: Canvas, cam: Camera, x: float, z: float, rng: np.random.Generator,
         cls: int) -> None:
    s = cam.scale(z)
    cx, base = cam.pt(x, 0, z)
    length, height = rng.uniform(1.5, 5.0) * s, rng.uniform(0.6, 1.4) * s
    green = (60 + rng.integers(0, 50), 110 + rng.integers(0, 50), 40 + rng.integers(0, 30))
    for k in range(int(rng.integers(3, 6))):
        ox = (k / 4.0 - 0.5) * length
        r = height * rng.uniform(0.55, 0.8)
        cv.ellipse(cx + ox, base - r * 0.8, r * 1.2, r, jitter(rng, green, 0.15), cls)


def pole(cv: Canvas, cam: Camera, x: float, z: float, side: int, rng: np.random.Generator,
         cls: int, ground: float = 0.0) -> None:
    """A lamp post standing at height ``ground``; its optional arm reaches toward ``-side``."""
    s = cam.scale(z)
    height = rng.uniform(4.5, 8.0)
    colour = jitter(rng, [(70, 70, 75), (110, 110, 115), (40, 60, 45)][rng.integers(3)], 0.15)
    cx, base = cam.pt(x, ground, z)
    _, top = cam.pt(x, ground + height, z)
    hw = max(1.0, 0.1 * s)
    cv.rect(cx - hw, top, cx + hw, base, colour, cls)
    if rng.random() < 0.6:  # lamp arm reaching over the road
        arm = rng.uniform(0.8, 2.0) * s * -side
        x0, x1 = sorted((cx, cx + arm))
        cv.rect(x0, top, x1, top + max(2.0, 0.12 * s), colour, cls)


def person(cv: Canvas, cam: Camera, x: float, z: float, rng: np.random.Generator,
           cls: int, ground: float = 0.0) -> None:
    """A standing person whose feet are at height ``ground`` (metres)."""
    s = cam.scale(z)
    height = rng.uniform(1.55, 1.95) * s
    cx, base = cam.pt(x, ground, z)
    pants = jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 0.15)
    shirt = jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 0.15)
    skin = jitter(rng, SKIN[rng.integers(len(SKIN))], 0.08)
    leg_w, hip = max(1.0, 0.09 * s), base - 0.47 * height
    stride = rng.uniform(-0.08, 0.08) * s
    for off in (-1, 1):
        lx = cx + off * (leg_w + 0.01 * s)
        cv.poly([(lx - leg_w, hip), (lx + leg_w, hip), (lx + leg_w + off * stride, base),
                 (lx - leg_w + off * stride, base)], pants, cls)
    sh = 0.23 * s
    cv.poly([(cx - sh * 0.85, hip + 0.03 * height), (cx + sh * 0.85, hip + 0.03 * height),
             (cx + sh, base - 0.81 * height), (cx - sh, base - 0.81 * height)], shirt, cls)
    for off in (-1, 1):  # arms
        ax = cx + off * sh
        cv.rect(min(ax, ax + off * 0.09 * s), base - 0.8 * height, max(ax, ax + off * 0.09 * s),
                base - 0.46 * height, shirt, cls)
    hr = max(1.2, 0.11 * s)
    cv.ellipse(cx, base - 0.81 * height - hr * 0.9, hr * 0.85, hr, skin, cls)
    if rng.random() < 0.4:  # hair / hat
        hair = jitter(rng, (50, 35, 25), 0.3)
        cv.ellipse(cx, base - 0.81 * height - hr * 1.35, hr * 0.85, hr * 0.55, hair, cls)


def car(cv: Canvas, cam: Camera, x: float, z: float, rng: np.random.Generator, cls: int) -> None:
    s = cam.scale(z)
    width, height = rng.uniform(1.7, 2.1), rng.uniform(1.35, 1.75)
    colour = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 0.12)
    cx, base = cam.pt(x, 0, z)
    hw = width * s / 2
    # shadow on the road (appearance only)
    cv.ellipse(cx, base - 0.02 * s, hw * 1.1, 0.18 * s + 0.5, (30, 30, 32), None)
    tyre = jitter(rng, (25, 25, 25), 0.1)
    for off in (-1, 1):
        wx = cx + off * (hw - 0.22 * s)
        cv.rect(wx - 0.18 * s, base - 0.62 * s, wx + 0.18 * s, base, tyre, cls)
    belt = base - 0.95 * s
    cv.rect(cx - hw, base - 0.25 * s, cx + hw, belt, colour, cls)
    roof = base - height * s
    inset = hw * rng.uniform(0.12, 0.22)
    cv.poly([(cx - hw, belt), (cx + hw, belt), (cx + hw - inset, roof), (cx - hw + inset, roof)],
            colour, cls)
    glass = jitter(rng, (50, 60, 75), 0.2)
    m = 0.08 * s
    cv.poly([(cx - hw + inset * 0.5 + m, belt - m), (cx + hw - inset * 0.5 - m, belt - m),
             (cx + hw - inset - m, roof + m), (cx - hw + inset + m, roof + m)], glass, None)
    lamp = (200, 30, 30) if rng.random() < 0.6 else (235, 230, 200)
    for off in (-1, 1):
        lx = cx + off * (hw - 0.2 * s)
        cv.rect(lx - 0.15 * s, belt + 0.12 * s, lx + 0.15 * s, belt + 0.28 * s, lamp, None)
    cv.rect(cx - 0.3 * s, base - 0.55 * s, cx + 0.3 * s, base - 0.42 * s, (220, 220, 210), None)
