"""Why did fusion change this pixel? Leave-one-out attribution of one image's segmentation.

A node fuses the k adapters nearest an image and segments with the result. :func:`explain`
puts that next to the base model's segmentation and, for every pixel the fusion changed, names
the adapter that pushed hardest towards the fused answer there. :func:`render` draws it as one
picture, :func:`to_json` gives the same numbers, and :func:`add_parser` is ``semla-node
explain``.

Attribution (leave-one-out margin drop). Let ``L`` be the fused class logits, bilinearly
upsampled to the image's size exactly as the masks are, and ``y`` the fused winner at a pixel.
The winning margin is ``m(L) = L[y] - max_{c != y} L[c]`` (0 with a single class). For each
contributing adapter i, ``L_{-i}`` is the segmentation with adapter i left out: its weight set to
0 and the others renormalised to sum to 1 (when they all underflowed to 0, the retrieval
softmax ``softmax(-d / T)`` over the others, which is the same thing without the underflow);
with k = 1 leaving the only adapter out is the base model. The margin drop of adapter i is
``m(L) - m(L_{-i})``, measured for the *fused* winner ``y`` in both. A pixel is *changed* when
the fused mask differs from the base mask, and it is attributed to the adapter with the largest
drop there (ties to the earlier, nearer adapter). Every other pixel is attributed -1.

Leave-one-out cannot split credit between redundant adapters: where the others alone would give
the same (or a stronger) fused answer, every drop is about 0 or negative and the pixel goes to
whichever is least negative. :attr:`Explanation.redundant` marks those pixels, and the k leave-one-out
segmentations run as one batch of per-image mixtures (float noise ~1e-5 against the merged path).

Everything runs on the caller's thread and uses only the public :class:`Node` calls. torch and
the node are imported on first use, so declaring the subcommand keeps ``semla-node --help`` fast
(and ``semla.registry.cli`` imports this module, never the other way round). The class colours of
a mask (:func:`palette`, :func:`overlay`) live here with the pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semla.registry.cli_common import (EXIT_OK, add_node_arguments, add_retrieval_arguments, build_node, parse_classes,
                                       retrieval_options)
from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_WEIGHTING,
    TEMPERATURE_RANGE,
    temperature_ok,
)
from semla.registry.weighting import check_guard_z, check_weighting
from semla.schemas.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from semla.registry.node import Contribution, Node, Retrieval

__all__ = [
    "AdapterStats", "Explanation", "explain", "render", "to_json", "add_parser", "adapter_colours", "palette", "overlay",
]

ATTRIBUTION_METHOD = "leave-one-out drop of the fused winner's logit margin"
_NOISE = 1e-3  # logits; merged and per-image mixture fusion differ by ~1e-5


@dataclasses.dataclass(frozen=True)
class AdapterStats:
    """What one contributing adapter did to the image.

    Attributes:
        attributed_share: share of the changed pixels attributed to it (0 when none changed).
        mean_margin_drop: mean margin drop over the changed pixels when it is left out
            (None when no pixel changed).
        mean_margin_drop_all: the same over every pixel of the image.
    """

    attributed_share: float
    mean_margin_drop: float | None
    mean_margin_drop_all: float


@dataclasses.dataclass
class Explanation:
    """One image's base and fused segmentation and which adapter changed what.

    Attributes:
        base_mask: uint8 (H, W) class indices from the base model alone.
        fused_mask: uint8 (H, W) class indices with the retrieved adapters fused.
        contributions: the fused adapters, nearest first.
        changed: bool (H, W), ``fused_mask != base_mask``.
        attribution: int64 (H, W): index into ``contributions`` of the adapter with the largest
            margin drop at a changed pixel, -1 elsewhere.
        margin_drop: float32 (k, H, W): margin drop when adapter i is left out.
        stats: one :class:`AdapterStats` per contribution, in the same order.
    """

    base_mask: np.ndarray
    fused_mask: np.ndarray
    contributions: list[Contribution]
    changed: np.ndarray
    attribution: np.ndarray
    margin_drop: np.ndarray
    stats: list[AdapterStats]

    @property
    def changed_share(self) -> float:
        """Share of the image's pixels that fusion changed."""
        return float(self.changed.mean())

    @property
    def redundant(self) -> np.ndarray:
        """bool (H, W): changed pixels where no single adapter's removal lowers the margin by more
        than float noise (the others alone keep the fused answer); still attributed by the largest drop."""
        return self.changed & (self.margin_drop.max(0) <= _NOISE)


# -- attribution ---------------------------------------------------------------------------------
def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, g, g) -> (C, H, W), the same interpolation :meth:`Node.masks` uses."""
    import torch.nn.functional as F

    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def _margin(logits: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Logit of ``winner`` (H, W) minus the best other class: (H, W)."""
    import torch

    win = logits.gather(0, winner[None])[0]
    if logits.shape[0] == 1:
        return torch.zeros_like(win)
    return win - logits.scatter(0, winner[None], float("-inf")).amax(0)


def _leave_one_out(node: Node, retrieval: Retrieval, options: dict) -> Retrieval:
    """k retrievals of one image in one batch; row i has adapter i at weight 0 and the others
    re-weighed by the same scheme without it (with the guard the base keeps its place, so its
    share grows as an adapter leaves)."""
    import torch

    from semla.registry.node import Retrieval

    idx, dist = retrieval.idx[0], retrieval.dist[0]  # (k,)
    k = len(idx)
    rows = torch.zeros(k, k, dtype=retrieval.weights.dtype, device=retrieval.weights.device)
    for i in range(k):
        keep = torch.tensor([j for j in range(k) if j != i], device=idx.device)
        rows[i, keep] = node.weigh(dist[keep][None], idx[keep][None], **options)[0].to(rows.dtype)
    return Retrieval(retrieval.idx.expand(k, k).contiguous(), retrieval.dist.expand(k, k).contiguous(), rows)


def _segment_and_drops(node: Node, array: np.ndarray, classes: list[str], *, top_k: int, **options: Any,
                       ) -> tuple[np.ndarray, np.ndarray, Retrieval, np.ndarray]:
    """Base mask, fused mask, the retrieval and the margin drops (k, H, W) of one image."""
    import torch

    size = (array.shape[0], array.shape[1])
    with torch.no_grad():
        text = node.text(classes)
        pixels, query = node.embed([array])
        base_logits = node.logits(node.fused_dense(pixels, None), [text])[0]  # (C, g, g)
        retrieval = node.retrieve(query, top_k=top_k, **options)
        fused_logits = node.logits(node.fused_dense(pixels, retrieval), [text])[0]
        base_mask, fused_mask = node.masks([base_logits, fused_logits], [size, size])
        k = retrieval.idx.shape[1]
        if k == 1:  # leaving the only adapter out is the base model
            left_out = [base_logits]
        else:  # the k leave-one-out mixtures in one batch
            loo = _leave_one_out(node, retrieval, options)
            left_out = node.logits(node.fused_dense(pixels.expand(k, *pixels.shape[1:]), loo), [text] * k)
        winner = torch.from_numpy(fused_mask).long().to(fused_logits.device)  # (H, W)
        margin = _margin(_upsample(fused_logits, size), winner)
        drop = torch.stack([margin - _margin(_upsample(lg, size), winner) for lg in left_out])  # (k, H, W)
    return base_mask, fused_mask, retrieval, drop.float().cpu().numpy()


def explain(
    node: Node,
    image: np.ndarray,
    classes: Sequence[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float | None = DEFAULT_TEMPERATURE,
    distance: str = DEFAULT_DISTANCE,
    weighting: str = DEFAULT_WEIGHTING,
    guard: bool = False,
    guard_z: float | None = None,
) -> Explanation:
    """Segment ``image`` with and without fusion and attribute every changed pixel to an adapter.

    The masks are exactly what ``node.segment([image], classes, with_base=True)`` returns; the
    attribution is the leave-one-out margin drop described in this module's docstring.

    Args:
        node: a node bound to a registry (pulled, or pulled on first use).
        image: uint8 (H, W, 3).
        classes: the vocabulary.
        weighting, guard, guard_z: as for :meth:`Node.segment`.

    Raises:
        InvalidInputError: not a uint8 RGB image, an empty class list, top-k < 1, T out of range,
            an unknown weighting or a bad guard_z.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(f"image must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    classes = list(classes)
    if not classes:
        raise InvalidInputError("the class list is empty")
    if top_k < 1 or not temperature_ok(temperature):
        raise InvalidInputError(f"top-k must be >= 1 and temperature within {TEMPERATURE_RANGE}")
    check_weighting(weighting)
    check_guard_z(guard_z)
    base_mask, fused_mask, retrieval, drop = _segment_and_drops(
        node, array, classes, top_k=top_k, temperature=temperature, distance=distance, weighting=weighting,
        guard=guard, guard_z=guard_z)
    k = len(drop)

    changed = fused_mask != base_mask
    attribution = np.where(changed, drop.argmax(0), -1).astype(np.int64)
    n_changed = int(changed.sum())
    stats = [
        AdapterStats(
            attributed_share=float((attribution == i).sum() / n_changed) if n_changed else 0.0,
            mean_margin_drop=float(drop[i][changed].mean()) if n_changed else None,
            mean_margin_drop_all=float(drop[i].mean()),
        )
        for i in range(k)
    ]
    return Explanation(base_mask, fused_mask, node.contributions(retrieval, 0), changed, attribution, drop, stats)


# -- numbers -------------------------------------------------------------------------------------
def to_json(explanation: Explanation, image_name: str, classes: Sequence[str]) -> dict:
    """The explanation's numbers as a JSON-ready dict (no per-pixel arrays)."""
    e = explanation
    n_classes = len(classes)
    base_counts = np.bincount(e.base_mask.ravel(), minlength=n_classes)
    fused_counts = np.bincount(e.fused_mask.ravel(), minlength=n_classes)
    return {
        "image": image_name,
        "size": [int(e.changed.shape[0]), int(e.changed.shape[1])],
        "classes": list(classes),
        "attribution": ATTRIBUTION_METHOD,
        "changed_share": round(e.changed_share, 6),
        "changed_pixels": int(e.changed.sum()),
        "base_weight": round(max(0.0, 1.0 - sum(c.weight for c in e.contributions)), 6),
        "redundant_pixels": int(e.redundant.sum()),
        "contributions": [
            {**dataclasses.asdict(c),
             "attributed_share": round(s.attributed_share, 6),
             "mean_margin_drop": None if s.mean_margin_drop is None else round(s.mean_margin_drop, 6),
             "mean_margin_drop_all": round(s.mean_margin_drop_all, 6)}
            for c, s in zip(e.contributions, e.stats)
        ],
        "class_pixels": [
            {"class": name, "base": int(base_counts[c]), "fused": int(fused_counts[c])}
            for c, name in enumerate(classes)
        ],
    }


# -- picture -------------------------------------------------------------------------------------
_ADAPTER_COLOURS = np.array([[255, 225, 25], [0, 200, 255], [255, 60, 200], [60, 220, 75], [255, 130, 40],
                             [150, 90, 255], [255, 255, 255], [170, 255, 195]], dtype=np.uint8)
_BG, _FG, _MUTED = (255, 255, 255), (20, 20, 20), (110, 110, 110)
_PAD, _TARGET = 16, 288


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8, (n, 3)), stable across runs."""
    base = np.array([[70, 130, 180], [128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35],
                     [0, 0, 142], [220, 20, 60], [153, 153, 153], [250, 170, 30], [152, 251, 152],
                     [255, 0, 0], [0, 60, 100]], dtype=np.uint8)
    if n <= len(base):
        return base[:n]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.integers(0, 256, size=(n - len(base), 3), dtype=np.uint8)])


def overlay(image: np.ndarray, mask: np.ndarray, n_classes: int, alpha: float = 0.5) -> np.ndarray:
    colours = palette(n_classes)[mask]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)


def adapter_colours(n: int) -> np.ndarray:
    """n RGB colours for adapters (uint8, (n, 3)), bright against the darkened change map."""
    if n <= len(_ADAPTER_COLOURS):
        return _ADAPTER_COLOURS[:n]
    rng = np.random.default_rng(1)
    extra = rng.integers(64, 256, size=(n - len(_ADAPTER_COLOURS), 3), dtype=np.uint8)
    return np.concatenate([_ADAPTER_COLOURS, extra])


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def _panel_size(h: int, w: int) -> tuple[int, int]:
    """Nearest-neighbour scale: small images up by an integer factor, large ones down to fit."""
    long = max(h, w)
    if long <= _TARGET:
        s = max(1, _TARGET // long)
        return w * s, h * s
    s = min(1.0, 2 * _TARGET / long)
    return max(1, round(w * s)), max(1, round(h * s))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(draw.textlength(text, font=font))


def render(explanation: Explanation, image: np.ndarray, classes: Sequence[str]) -> Image.Image:
    """One RGB picture: image, base mask, fused mask, changes by adapter; weights and legends below."""
    e = explanation
    image = np.asarray(image, dtype=np.uint8)
    k, n_classes = len(e.contributions), len(classes)
    class_rgb, adapter_rgb = palette(n_classes), adapter_colours(k)

    dim = (image.astype(np.float32).mean(2, keepdims=True) * 0.35).astype(np.uint8).repeat(3, 2)
    change_map = dim.copy()
    change_map[e.changed] = adapter_rgb[e.attribution[e.changed]]
    changed_pct = 100 * e.changed_share
    panels = [
        ("image", image),
        ("base model", class_rgb[e.base_mask]),
        (f"fused ({k} adapter{'s' if k != 1 else ''})", class_rgb[e.fused_mask]),
        (f"changed {changed_pct:.1f}%, by adapter", change_map),
    ]

    title_font, font, small = _font(18), _font(15), _font(13)
    pw, ph = _panel_size(*image.shape[:2])
    title_h, line_h = 26, 22
    names = [f"{c.name} v{c.version}" for c in e.contributions]
    bar_rows, legend_rows = k, n_classes
    bottom_h = 30 + max(bar_rows * line_h + 44, legend_rows * line_h) + _PAD
    width = _PAD + 4 * (pw + _PAD)
    height = _PAD + title_h + ph + _PAD + bottom_h
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)

    for j, (title, array) in enumerate(panels):
        x = _PAD + j * (pw + _PAD)
        draw.text((x, _PAD), title, fill=_FG, font=title_font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(array)).resize((pw, ph), Image.NEAREST), (x, _PAD + title_h))
        draw.rectangle((x - 1, _PAD + title_h - 1, x + pw, _PAD + title_h + ph), outline=(200, 200, 200))

    top = _PAD + title_h + ph + _PAD
    # adapter weights: bar chart and the change map's legend in one (swatch colour = map colour)
    left = _PAD
    area_w = 2 * pw + _PAD
    draw.text((left, top), "adapter weights  (colour = change map; share of changes)", fill=_FG, font=title_font)
    label_w = max([_text_width(draw, n, font) for n in names] + [40]) + 24
    tail_w = _text_width(draw, "0.000  100% of changes", font) + 8
    bar_max = max(40, area_w - label_w - tail_w)
    y = top + 30
    for c, s, name, rgb in zip(e.contributions, e.stats, names, adapter_rgb):
        colour = tuple(int(v) for v in rgb)
        draw.rectangle((left, y + 3, left + 14, y + 17), fill=colour, outline=_FG)
        draw.text((left + 20, y + 1), name, fill=_FG, font=font)
        x0 = left + label_w
        bar = max(1, round(bar_max * c.weight))
        draw.rectangle((x0, y + 2, x0 + bar_max, y + 18), outline=(210, 210, 210))
        draw.rectangle((x0, y + 2, x0 + bar, y + 18), fill=colour, outline=_FG)
        weight = f"{c.weight:.3f}" if c.weight >= 0.0005 else "<0.001"
        draw.text((x0 + bar_max + 8, y + 1), f"{weight}  {100 * s.attributed_share:3.0f}% of changes",
                  fill=_FG, font=font)
        y += line_h
    draw.text((left, y + 6), f"top-k {k}; each changed pixel goes to the adapter whose removal drops the",
              fill=_MUTED, font=small)
    draw.text((left, y + 6 + 16), "fused winner's logit margin most"
              + (f"; {100 * e.redundant.sum() / max(1, e.changed.sum()):.1f}% of changes survive any single removal"
                 if e.redundant.any() else ""), fill=_MUTED, font=small)

    # class legend: colour, name, share of the image in base -> fused
    left = _PAD + 2 * (pw + _PAD)
    draw.text((left, top), "classes  (% of image: base -> fused)", fill=_FG, font=title_font)
    total = e.base_mask.size
    base_counts = np.bincount(e.base_mask.ravel(), minlength=n_classes)
    fused_counts = np.bincount(e.fused_mask.ravel(), minlength=n_classes)
    y = top + 30
    name_w = max(_text_width(draw, c, font) for c in classes) + 30
    for c, name in enumerate(classes):
        rgb = tuple(int(v) for v in class_rgb[c])
        draw.rectangle((left, y + 3, left + 14, y + 17), fill=rgb, outline=_FG)
        draw.text((left + 20, y + 1), name, fill=_FG, font=font)
        b, f = 100 * base_counts[c] / total, 100 * fused_counts[c] / total
        delta = f - b
        draw.text((left + name_w, y + 1), f"{b:5.1f}% -> {f:5.1f}%", fill=_FG, font=font)
        if abs(delta) >= 0.05:
            draw.text((left + name_w + 120, y + 1), f"({delta:+.1f})", fill=_MUTED, font=font)
        y += line_h
    return canvas


# -- command line --------------------------------------------------------------------------------
def _explain_command(args: argparse.Namespace) -> int:
    from semla.registry.data import read_image

    classes = parse_classes(args.classes)
    stems = [p.stem for p in args.images]
    if len(set(stems)) != len(stems):
        raise InvalidInputError("two images share a file name stem; their outputs would overwrite each other")
    images = [read_image(p) for p in args.images]  # fail on a bad image before any download
    node = build_node(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, image in zip(args.images, images):
        e = explain(node, image, classes, **retrieval_options(args))
        png, doc = args.out / f"{path.stem}.explain.png", args.out / f"{path.stem}.explain.json"
        render(e, image, classes).save(png)
        doc.write_text(json.dumps(to_json(e, str(path), classes), indent=2) + "\n")
        who = ", ".join(f"{c.name} v{c.version} w {c.weight:.2f} -> {100 * s.attributed_share:.0f}%"
                        for c, s in zip(e.contributions, e.stats))
        print(f"{path}: {100 * e.changed_share:.1f}% of pixels changed ({who}); {png}")
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``semla-node explain`` on a ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "explain", help="show which adapter changed which pixels (picture + JSON per image)",
        description="Segment each image with the base model and with the retrieved, fused adapters; attribute "
                    "every changed pixel to the adapter whose removal drops the fused winner's logit margin the "
                    "most. Writes DIR/<stem>.explain.png and DIR/<stem>.explain.json.")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG/JPEG)")
    p.add_argument("--classes", required=True, help="comma-separated class names (any vocabulary)")
    p.add_argument("--out", required=True, type=Path, help="write DIR/<stem>.explain.png and .explain.json")
    add_retrieval_arguments(p, top_k=DEFAULT_TOP_K, temperature=DEFAULT_TEMPERATURE)
    add_node_arguments(p)
    p.set_defaults(func=_explain_command)
    return p
