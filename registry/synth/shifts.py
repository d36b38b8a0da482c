"""Appearance shifts: fog, night, rain, sensor noise… Each changes pixels only, never the mask."""

from __future__ import annotations


import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from semla.registry.synth.drawing import (
    box_blur, glow, luma, smooth_noise,
)


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
