"""A synthetic benchmark shaped like the SemLA paper's: 20 domains from 10 datasets, and a source set.

The paper (Qorbani et al., CVPR 2025) evaluates on 20 domains from real datasets: 16 driving
domains from Cityscapes, BDD100K, Mapillary Vistas, IDD, ACDC (4 adverse conditions) and MUSES
(8 weather x time conditions), and 4 general or indoor ones (ADE20K, PASCAL-Context, NYUv2,
COCONut). Its base model is trained on COCO-Stuff. Driving domains share camera, content and
labelling and differ from the base's training data, so adapters carry a large shared component
that transfers; general datasets have less in common.

This module builds that structure from the scenes of :mod:`semla.registry.synth`:

* A :class:`PaperDataset` differs from another the way real datasets do: its **camera** (height,
  field of view, horizon, an ego-vehicle hood at the bottom), its **layout statistics** (road
  and sidewalk widths, facades, how many objects), its **palette and textures** (per-class
  colour gains, saturation, surface grain), its **sensor** (white balance, tone curve, blur,
  noise, vignette) and its **labelling** (which class names, and what each covers: renames,
  merges, classes left unlabelled).
* A **condition** (fog, night, rain, snow and their night combinations) is one of
  :mod:`~semla.registry.synth`'s appearance shifts and acts across datasets: fog in the
  ACDC-like dataset is the same physical effect as fog in the MUSES-like one, seen through a
  different camera and sensor.
* The **source set** (:data:`SOURCE`) plays COCO-Stuff's role for the base model: every scene
  type under a generic camera, neutral palette and clean sensor, labelled with generic
  (COCO-Stuff-like) names. Driving datasets use Cityscapes-like names (``sidewalk``,
  ``vegetation``, ``terrain``) the source never uses, and ignore the ego hood, as Cityscapes
  does: the shared component a driving adapter learns.

Rendering order: layout and camera → palette → condition → sensor → labelling of the mask.
Everything is deterministic in ``(domain, seed, index)``; :func:`split_seeds` gives each
domain distinct train and test seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from semla.registry.synth.drawing import (
    Camera, Canvas, box_blur, downsample, luma, sky_image, smooth_noise, texture, to_uint8,
)
from semla.registry.synth.registry import get_scene, get_shift
from semla.registry.synth.scenes import FIELDS_CLASSES, HARBOUR_CLASSES, INDOOR_CLASSES
from semla.registry.synth.street import (
    STREET_CLASSES,
    _Street,
    _TEX_FINE,
    _TEX_LOW,
    _TEX_MID,
    _draw_back_row,
    _draw_facades,
    _draw_ground,
    _draw_objects,
    _plan_objects,
)
from semla.registry.synth.writer import _check_args, _shift_rng
from semla.schemas.errors import InvalidInputError

__all__ = [
    "CameraSpec", "LayoutSpec", "Palette", "Sensor", "PaperDataset", "PaperDomain",
    "RAW_CLASSES", "DATASETS", "DOMAINS", "SOURCE", "SOURCE_DOMAIN",
    "paper_domains", "get_domain", "classes", "render", "render_source", "split_seeds", "write_dataset",
]

# -- the raw classes each scene renders (before a dataset's labelling) ---------------------------

#: street: synth's eight street classes plus grass ground (``terrain``) and the ego vehicle's hood.
RAW_CLASSES: dict[str, tuple[str, ...]] = {
    "street": STREET_CLASSES + ("terrain", "hood"),
    "indoor": INDOOR_CLASSES,
    "harbour": HARBOUR_CLASSES,
    "fields": FIELDS_CLASSES,
}
_VEG, _TERRAIN, _HOOD = 4, 8, 9


@dataclass(frozen=True)
class CameraSpec:
    """Ranges (low, high) drawn per image. ``focal`` and ``horizon`` are fractions of the image side;
    ``height`` in metres (street only); ``zoom`` crops other scenes (a narrower field of view);
    ``hood``: the fraction of the image the ego vehicle's bonnet covers (0: none)."""

    focal: tuple[float, float] = (0.6, 0.95)
    height: tuple[float, float] = (1.3, 1.8)
    horizon: tuple[float, float] = (0.34, 0.5)
    centre: tuple[float, float] = (0.35, 0.65)
    zoom: tuple[float, float] = (1.0, 1.0)
    tilt: tuple[float, float] = (0.0, 0.0)  # vertical offset of the crop, as a fraction of the slack
    hood: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class LayoutSpec:
    """Street layout statistics: lane and sidewalk widths (metres), facades, object density."""

    road: tuple[float, float] = (2.0, 5.5)
    walk: tuple[float, float] = (2.0, 5.0)
    facades: float = 0.85  # probability of a row of facades on each side
    depth: tuple[float, float] = (40.0, 120.0)
    density: float = 1.0  # expected multiple of synth's object counts


@dataclass(frozen=True)
class Palette:
    """Per raw class colour gains (r, g, b), global saturation, extra surface grain."""

    gains: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    saturation: float = 1.0
    grain: float = 0.0


@dataclass(frozen=True)
class Sensor:
    """The camera's own signature: white balance, tone curve, blur, noise, vignette."""

    white: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    contrast: float = 1.0
    blur: int = 0
    noise: float = 0.0
    vignette: float = 0.0


@dataclass(frozen=True)
class PaperDataset:
    """A synthetic dataset: scenes it shows (with weights) and how it sees and labels them.

    ``labels`` maps a raw class name to the dataset's name for it, or ``None`` (unlabelled, 255);
    two raw classes with the same name are merged. Unmapped raw classes keep their name.
    """

    name: str
    like: str
    kind: str  # "driving" or "general"
    scenes: tuple[tuple[str, float], ...]
    camera: CameraSpec = CameraSpec()
    layout: LayoutSpec = LayoutSpec()
    palette: Palette = Palette()
    sensor: Sensor = Sensor()
    labels: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperDomain:
    """One benchmark domain: a dataset under a condition (a chain of synth shifts)."""

    name: str
    dataset: str
    condition: tuple[str, ...]
    description: str


# -- labelling conventions --------------------------------------------------------------------------

#: COCO-Stuff-like generic names: what the source set (and the base) uses.
GENERIC_LABELS = {"sidewalk": "pavement", "vegetation": "tree", "terrain": "grass", "hood": None}
#: Cityscapes-like driving names: ``sidewalk``, ``vegetation``, ``terrain``; the hood is ignored.
DRIVING_LABELS = {"hood": None}

_NEUTRAL = Palette()
DATASETS: dict[str, PaperDataset] = {}


def _dataset(ds: PaperDataset) -> None:
    DATASETS[ds.name] = ds


# The source: every scene type, generic camera (synth's own ranges), neutral look, generic names.
SOURCE = PaperDataset(
    "source", "COCO-Stuff", "source", (("street", 1.0), ("indoor", 1.0), ("harbour", 1.0), ("fields", 1.0)),
    labels=GENERIC_LABELS,
)
SOURCE_DOMAIN = PaperDomain("source", "source", ("none",), "the base model's training set")

# 16 driving domains from 6 datasets.
_dataset(PaperDataset(
    "metro", "Cityscapes", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.85, 1.0), height=(1.2, 1.35), horizon=(0.42, 0.47), centre=(0.47, 0.53),
                      hood=(0.1, 0.14)),
    layout=LayoutSpec(road=(2.5, 4.0), walk=(2.5, 4.5), facades=0.95, depth=(50.0, 120.0), density=1.5),
    palette=Palette({"building": (0.92, 0.92, 0.95), "road": (0.85, 0.85, 0.9)}, saturation=0.8, grain=0.03),
    sensor=Sensor(white=(0.97, 1.0, 1.04), gamma=1.1, contrast=1.15),
    labels=DRIVING_LABELS))
_dataset(PaperDataset(
    "fleet", "BDD100K", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.5, 0.62), height=(1.15, 1.3), horizon=(0.45, 0.55), centre=(0.42, 0.58),
                      hood=(0.14, 0.2)),
    layout=LayoutSpec(road=(3.5, 6.5), walk=(1.5, 3.5), facades=0.6, depth=(40.0, 100.0), density=1.3),
    palette=Palette({"road": (1.0, 0.97, 0.92)}, saturation=0.9, grain=0.05),
    sensor=Sensor(white=(1.08, 1.0, 0.88), gamma=0.9, contrast=0.85, blur=1, noise=0.03, vignette=0.35),
    labels=DRIVING_LABELS))
_dataset(PaperDataset(
    "vista", "Mapillary Vistas", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.45, 1.0), height=(1.0, 2.6), horizon=(0.3, 0.55), centre=(0.35, 0.65)),
    layout=LayoutSpec(road=(1.8, 6.0), walk=(1.5, 5.0), facades=0.75),
    palette=Palette({"vegetation": (0.9, 1.1, 0.8), "building": (1.1, 0.95, 0.85)}, saturation=1.3, grain=0.04),
    sensor=Sensor(white=(1.0, 1.02, 0.98), gamma=0.95, contrast=1.2, vignette=0.15),
    labels=DRIVING_LABELS))
_dataset(PaperDataset(
    "delhi", "IDD", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.6, 0.75), height=(1.3, 1.5), horizon=(0.4, 0.48), centre=(0.45, 0.55),
                      hood=(0.08, 0.12)),
    layout=LayoutSpec(road=(1.5, 3.0), walk=(0.6, 1.6), facades=0.5, depth=(30.0, 80.0), density=2.0),
    palette=Palette({"building": (1.2, 1.0, 0.75), "road": (1.1, 1.0, 0.85), "sidewalk": (1.15, 1.0, 0.8),
                     "terrain": (1.2, 1.0, 0.7)}, saturation=0.85, grain=0.08),
    sensor=Sensor(white=(1.1, 1.02, 0.85), gamma=0.9, contrast=0.9, blur=1, noise=0.02),
    # IDD-style labelling: "vehicle", drivable ground merged, unpaved ground lumped with vegetation, no poles
    labels={"hood": None, "car": "vehicle", "sidewalk": "road", "terrain": "vegetation", "pole": None}))
_dataset(PaperDataset(
    "adverse", "ACDC", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.62, 0.72), height=(1.35, 1.5), horizon=(0.4, 0.46), centre=(0.46, 0.54),
                      hood=(0.05, 0.08)),
    layout=LayoutSpec(road=(2.5, 4.5), walk=(2.0, 4.0), facades=0.85, density=1.0),
    palette=Palette({"building": (0.9, 0.95, 1.0)}, saturation=0.85, grain=0.03),
    sensor=Sensor(white=(0.95, 1.0, 1.06), gamma=1.0, contrast=1.05, noise=0.015),
    labels=DRIVING_LABELS))
_dataset(PaperDataset(
    "allweather", "MUSES", "driving", (("street", 1.0),),
    camera=CameraSpec(focal=(0.7, 0.82), height=(1.7, 1.9), horizon=(0.36, 0.42), centre=(0.47, 0.53)),
    layout=LayoutSpec(road=(2.5, 5.0), walk=(2.0, 4.5), facades=0.7, depth=(40.0, 100.0), density=0.9),
    palette=Palette({"vegetation": (0.85, 1.0, 0.85), "terrain": (0.9, 1.0, 0.8)}, saturation=0.9, grain=0.03),
    sensor=Sensor(white=(1.0, 1.03, 0.97), gamma=0.85, contrast=0.8, vignette=0.2),
    labels=DRIVING_LABELS))

# 4 general / indoor datasets.
_dataset(PaperDataset(
    "atlas", "ADE20K", "general", (("street", 1.0), ("indoor", 1.5), ("harbour", 1.0), ("fields", 1.0)),
    camera=CameraSpec(zoom=(1.0, 1.5), tilt=(0.0, 1.0)),
    palette=Palette({"wall": (1.05, 0.98, 0.9), "water": (0.85, 1.0, 1.05)}, saturation=1.1, grain=0.03),
    sensor=Sensor(gamma=0.95, contrast=1.05),
    labels={"sidewalk": "sidewalk", "vegetation": "tree", "terrain": "grass", "hood": None, "shelf": "cabinet",
            "pier": "dock"}))
_dataset(PaperDataset(
    "context", "PASCAL-Context", "general", (("street", 1.0), ("indoor", 1.0), ("harbour", 1.0), ("fields", 1.0)),
    camera=CameraSpec(zoom=(1.2, 1.8), tilt=(0.2, 0.8)),
    palette=Palette({"sky": (0.9, 0.95, 1.1)}, saturation=1.2, grain=0.02),
    sensor=Sensor(white=(1.04, 1.0, 0.95), gamma=0.9, contrast=1.1, blur=1),
    # coarse "ground": road, pavement and grass merged; furniture merged; small things unlabelled
    labels={"road": "ground", "sidewalk": "ground", "terrain": "ground", "field": "ground", "vegetation": "tree",
            "hood": None, "table": "furniture", "chair": "furniture", "shelf": "furniture", "pole": None,
            "lamp": None, "pier": "ground"}))
_dataset(PaperDataset(
    "rooms", "NYUv2", "general", (("indoor", 1.0),),
    camera=CameraSpec(zoom=(1.1, 1.4), tilt=(0.5, 1.0)),
    palette=Palette({"wall": (1.0, 0.95, 0.9), "floor": (0.9, 0.85, 0.8)}, saturation=0.8, grain=0.05),
    sensor=Sensor(white=(1.1, 1.0, 0.85), gamma=1.15, contrast=0.9, blur=1, noise=0.035, vignette=0.3),
    labels={"shelf": "bookshelf", "lamp": None}))
_dataset(PaperDataset(
    "panoptic", "COCONut", "general", (("street", 1.0), ("indoor", 1.0), ("harbour", 1.0), ("fields", 1.0)),
    camera=CameraSpec(zoom=(1.0, 1.3), tilt=(0.0, 1.0)),
    palette=Palette(saturation=1.05, grain=0.02),
    sensor=Sensor(gamma=0.97, contrast=1.05),
    labels=GENERIC_LABELS))

_CONDITIONS = {
    "clear": ("none",), "night": ("night",), "fog": ("fog",), "rain": ("rain",), "snow": ("snow",),
    "fog_night": ("fog", "night", "bloom"), "rain_night": ("night", "rain"), "snow_night": ("snow", "night"),
}


def _domains() -> dict[str, PaperDomain]:
    out: dict[str, PaperDomain] = {}

    def add(dataset: str, condition: str, name: str | None = None) -> None:
        ds = DATASETS[dataset]
        name = name or f"{dataset}_{condition}"
        out[name] = PaperDomain(name, dataset, _CONDITIONS[condition],
                                f"{ds.kind} scenes like {ds.like}, {condition.replace('_', ' ')}")

    for cond in ("clear", "fog", "rain", "snow", "night", "fog_night", "rain_night", "snow_night"):
        add("allweather", cond)  # MUSES-like: 8 weather x time conditions
    for cond in ("fog", "night", "rain", "snow"):
        add("adverse", cond)  # ACDC-like: 4 adverse conditions
    for ds in ("metro", "fleet", "vista", "delhi", "atlas", "context", "rooms", "panoptic"):
        add(ds, "clear", ds)  # single-condition datasets
    return out


DOMAINS: dict[str, PaperDomain] = _domains()


def paper_domains() -> list[str]:
    """The 20 domains: 16 driving (8 MUSES-like, 4 ACDC-like, 4 single-condition), then 4 general."""
    return list(DOMAINS)


def get_domain(name: str) -> PaperDomain:
    """Raises :class:`InvalidInputError` naming the valid domains."""
    if name == SOURCE_DOMAIN.name:
        return SOURCE_DOMAIN
    try:
        return DOMAINS[name]
    except KeyError:
        raise InvalidInputError(f"unknown domain {name!r}; valid: {', '.join(DOMAINS)}") from None


def _dataset_of(domain: str) -> PaperDataset:
    return SOURCE if domain == SOURCE_DOMAIN.name else DATASETS[get_domain(domain).dataset]


def _label_map(ds: PaperDataset) -> tuple[list[str], dict[str, np.ndarray]]:
    """The dataset's class list and, per scene, a lookup table raw class id → dataset class id (255: none)."""
    names: list[str] = []
    luts = {}
    for scene, _ in ds.scenes:
        lut = np.full(256, 255, np.uint8)
        for i, raw in enumerate(RAW_CLASSES[scene]):
            name = ds.labels.get(raw, raw)
            if name is None:
                continue
            if name not in names:
                names.append(name)
            lut[i] = names.index(name)
        luts[scene] = lut
    return names, luts


def classes(domain: str) -> list[str]:
    """The class names of a domain (its dataset's labelling); mask value i means ``classes[i]``."""
    return _label_map(_dataset_of(domain))[0]


def split_seeds(domain: str) -> tuple[int, int]:
    """``(train_seed, test_seed)``: distinct, fixed by the domain's name, disjoint from synth's."""
    base = 2 * zlib.crc32(f"paper:{get_domain(domain).name}".encode())
    return base, base + 1


# -- rendering ----------------------------------------------------------------------------------------


def _street(rng: np.random.Generator, size: int, cam_spec: CameraSpec, lay: LayoutSpec) -> tuple[np.ndarray, np.ndarray]:
    """synth's street, seen through this dataset's camera and laid out by its statistics."""
    s = 2 * size
    u = lambda r: rng.uniform(*r)  # noqa: E731
    cam = Camera(f=s * u(cam_spec.focal), hc=u(cam_spec.height), vx=s * u(cam_spec.centre), hy=s * u(cam_spec.horizon))
    road_l, road_r = -u(lay.road), u(lay.road)
    z_end = u(lay.depth)
    st = _Street(road_l=road_l, road_r=road_r, walk_l=road_l - u(lay.walk), walk_r=road_r + u(lay.walk),
                       z_end=z_end, z_back=z_end + rng.uniform(5.0, 60.0))
    cv = Canvas(s)
    _draw_ground(cv, cam, st, rng)
    ground = np.asarray(cv.mask, dtype=np.uint8)  # grass is the only vegetation so far: it is terrain
    cv.mask.paste(Image.fromarray(np.where(ground == _VEG, _TERRAIN, ground).astype(np.uint8)))
    _draw_back_row(cv, cam, st, rng)
    for side in (-1, 1):
        if rng.random() < lay.facades:
            _draw_facades(cv, cam, st, rng, side)
    objs = _plan_objects(cam, st, rng)
    extra = lay.density - 1.0
    while extra > 0:  # denser streets: more plans, the last one thinned
        more = _plan_objects(cam, st, rng)
        objs += [o for o in more if rng.random() < min(extra, 1.0)]
        extra -= 1.0
    if lay.density < 1.0:
        objs = [o for o in objs if rng.random() < lay.density]
    objs.sort(key=lambda o: -o[0])
    _draw_objects(cv, cam, objs, rng)
    hood = u(cam_spec.hood)
    if hood > 0:  # the ego vehicle's bonnet: a dark curved band at the bottom
        top = s * (1 - hood)
        bulge = s * hood * rng.uniform(0.2, 0.45)
        xs = np.linspace(-0.1 * s, 1.1 * s, 24)
        curve = [(x, top + bulge * ((x - s / 2) / (0.6 * s)) ** 2) for x in xs]
        colour = tuple(int(c) for c in rng.uniform(15, 70) * rng.uniform(0.8, 1.2, 3))
        cv.poly(curve + [(1.1 * s, s + 2), (-0.1 * s, s + 2)], colour, _HOOD)
    mask, rgb = cv.arrays()
    rgb = np.where((mask == 0)[..., None], sky_image(rng, s, cam.hy), rgb)
    fine = np.concatenate([_TEX_FINE, [0.08, 0.01]]).astype(np.float32)
    mid = np.concatenate([_TEX_MID, [0.2, 0.0]]).astype(np.float32)
    low = np.concatenate([_TEX_LOW, [0.1, 0.0]]).astype(np.float32)
    rgb = np.clip(texture(rgb, mask, rng, fine, mid, low), 0.0, 1.0)
    return downsample(rgb, mask, size)


def _reframe(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, spec: CameraSpec) -> tuple[np.ndarray, np.ndarray]:
    """A narrower field of view (zoom) and another camera tilt (vertical crop position)."""
    zoom = rng.uniform(*spec.zoom)
    if zoom <= 1.0 + 1e-6:
        return rgb, mask
    size = mask.shape[0]
    side = max(8, int(round(size / zoom)))
    slack = size - side
    y0 = int(round(slack * rng.uniform(*spec.tilt)))
    x0 = int(rng.integers(0, slack + 1))
    crop = lambda a: a[y0:y0 + side, x0:x0 + side]  # noqa: E731
    up = Image.fromarray(np.ascontiguousarray(crop(mask))).resize((size, size), Image.NEAREST)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(crop(rgb)[..., c])).resize((size, size), Image.BILINEAR))
                for c in range(3)]
    return np.stack(channels, -1).astype(np.float32), np.asarray(up, dtype=np.uint8)


def _look(rgb: np.ndarray, mask: np.ndarray, scene: str, palette: Palette, rng: np.random.Generator) -> np.ndarray:
    gains = np.ones((256, 3), np.float32)
    for i, raw in enumerate(RAW_CLASSES[scene]):
        if raw in palette.gains:
            gains[i] = palette.gains[raw]
    out = rgb * gains[mask]
    if palette.saturation != 1.0:
        lum = luma(out)[..., None]
        out = lum + palette.saturation * (out - lum)
    if palette.grain:
        h, w = mask.shape
        out = out * (1 + palette.grain * smooth_noise(rng, h, w, w // 3))[..., None]
    return np.clip(out, 0, 1).astype(np.float32)


def _sense(rgb: np.ndarray, sensor: Sensor, rng: np.random.Generator) -> np.ndarray:
    out = rgb * np.asarray(sensor.white, np.float32)
    out = np.clip(out, 0, 1) ** sensor.gamma
    out = 0.5 + sensor.contrast * (out - 0.5)
    if sensor.blur:
        out = box_blur(out, sensor.blur)
    if sensor.vignette:
        h, w, _ = out.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
        out = out * (1 - sensor.vignette * np.clip(r2 / 2, 0, 1))[..., None]
    if sensor.noise:
        out = out + rng.normal(0.0, sensor.noise, out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def _render(ds: PaperDataset, condition: tuple[str, ...], seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(seed), int(index), 7])
    weights = np.array([w for _, w in ds.scenes], np.float64)
    scene = ds.scenes[int(rng.choice(len(weights), p=weights / weights.sum()))][0]
    layout_rng = np.random.default_rng([int(seed), int(index), 0])
    if scene == "street":
        rgb, mask = _street(layout_rng, size, ds.camera, ds.layout)
    else:
        rgb, mask = get_scene(scene).render(layout_rng, size)
        rgb, mask = _reframe(rgb.astype(np.float32), mask, rng, ds.camera)
    rgb = _look(rgb, mask, scene, ds.palette, rng)
    for name in condition:
        rgb = get_shift(name).apply(rgb.astype(np.float32), _shift_rng(int(seed), int(index), name))
    rgb = _sense(rgb, ds.sensor, rng)
    _, luts = _label_map(ds)
    return to_uint8(rgb), luts[scene][mask]


def render(domain: str, seed: int, index: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One image of a domain and its mask (uint8, values index :func:`classes`, 255 unlabelled)."""
    dom = get_domain(domain)
    _check_args(seed, index, size)
    return _render(_dataset_of(domain), dom.condition, seed, index, size)


def render_source(n: int, seed: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """``n`` images of every source scene type (generic camera and look, generic names), for the base."""
    ds, images, masks = SOURCE, [], []
    for k, (scene, _) in enumerate(ds.scenes):
        one = PaperDataset(ds.name, ds.like, ds.kind, ((scene, 1.0),), labels=ds.labels)
        lut = _lut_to(one, classes(SOURCE_DOMAIN.name))
        for i in range(n):
            img, mask = _render(one, ("none",), seed + k, i, size)
            images.append(img)
            masks.append(lut[mask])
    return images, masks, classes(SOURCE_DOMAIN.name)


def _lut_to(ds: PaperDataset, names: list[str]) -> np.ndarray:
    own = _label_map(ds)[0]
    lut = np.full(256, 255, np.uint8)
    lut[: len(own)] = [names.index(c) for c in own]
    return lut


def write_dataset(domain: str, n: int, seed: int, out: Path | str, size: int = 96) -> Path:
    """``n`` images in the layout :func:`semla.registry.data.load_dataset` reads, written atomically.

    Raises:
        InvalidInputError: unknown domain, ``n < 1``, or ``out`` exists and is not empty.
    """
    dom = get_domain(domain)
    if int(n) < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"refusing to overwrite {out}: it exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in classes(domain)), encoding="utf-8")
        ds = _dataset_of(domain)
        meta = {"domain": dom.name, "dataset": ds.name, "like": ds.like, "condition": list(dom.condition),
                "seed": int(seed), "n": int(n), "size": int(size)}
        (tmp / "domain.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for i in range(int(n)):
            rgb, mask = render(domain, seed, i, size)
            Image.fromarray(rgb).save(tmp / "images" / f"{i:05d}.png")
            Image.fromarray(mask).save(tmp / "masks" / f"{i:05d}.png")
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
