"""Rendering images and writing datasets (and contact sheets) of a registered domain."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from semla.registry.synth.drawing import (
    to_uint8,
)
from semla.schemas.errors import InvalidInputError
from semla.registry.synth.domains import benchmark_domains, split_seeds
from semla.registry.synth.registry import MIN_SIZE, SCENES, Domain, get_domain, get_scene, get_shift



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

