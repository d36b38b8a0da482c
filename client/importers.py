"""Dataset importers: standard segmentation layouts → the private-data folder ``train`` reads.

The output is exactly what :func:`semla.registry.data.load_dataset` expects:
``images/00000.png`` (RGB), ``masks/00000.png`` (mode L, class index per pixel, 255 = ignore),
``classes.txt`` (line i = class i) and, with a domain given, ``domain.json``. Nothing else is
copied: every image and mask is decoded and re-encoded as a plain PNG (no EXIF, no text
chunks, no colour profile), and files are numbered, so no source path or file name reaches the
folder, the bundle trained on it, or the registry.

Formats live in :data:`IMPORTERS` (``list_importers()``), each a scan function that pairs
images with label files and says how label values map to class indices:

* ``cityscapes``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; the official labelId → trainId table gives
  the 19 evaluation classes, every other id is ignored (255). The folder names and suffixes
  are options, so ACDC (``rgb_anon/<condition>`` / ``gt/<condition>``, ``_rgb_anon.png`` /
  ``_gt_labelIds.png``) and other data in this layout load the same way.
* ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
  ``annotations/…/<stem>.png``; 150 classes, value 0 (other) → 255, k → k - 1.
* ``folder``: ``images/`` + ``masks/`` (same stem, class indices, 255 = ignore) + a class list.

A tree that does not fit gets an :class:`InvalidInputError` naming the first missing or
mismatched file; the output folder is built in a temp dir beside ``out`` and renamed into
place, so a failed import leaves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semla.client._ade20k import ADE20K_CLASSES
from semla.registry.data import IGNORE_INDEX, IMAGE_SUFFIXES
from semla.registry.names import Registry
from semla.schemas.errors import InvalidInputError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "ADE20K_CLASSES",
    "IMPORTERS",
    "ImportOptions",
    "Source",
    "Importer",
    "register_importer",
    "list_importers",
    "ImportResult",
    "import_dataset",
    "add_parser",
]

#: Largest image or label accepted, in pixels (checked from the header, before decoding).
MAX_PIXELS = 64 * 1024 * 1024
#: Largest file read as an image or label.
MAX_FILE_BYTES = 256 * 1024 * 1024

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: Official Cityscapes labelId → trainId for the 19 evaluation classes; every other id → 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_MAX_ID = 33


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """Where a format looks; ``None`` means the format's own default.

    Attributes:
        split: the split folder (cityscapes, ade20k: default ``train``; folder: none).
        images_dir / labels_dir: folder names under the root.
        image_suffix / label_suffix: cityscapes-layout file name endings.
        classes: a class list file (folder format; default ``ROOT/classes.txt``).
    """

    split: str | None = None
    images_dir: str | None = None
    labels_dir: str | None = None
    image_suffix: str | None = None
    label_suffix: str | None = None
    classes: Path | None = None


@dataclasses.dataclass
class Source:
    """What a scan found: class names, (image, label) pairs in order, and the label lookup table
    (label value v → class index ``lut[v]``, 255 = ignore; -1 or ``v >= len(lut)`` is a mismatch)."""

    classes: list[str]
    pairs: list[tuple[Path, Path]]
    lut: np.ndarray
    what: str  # how a bad label value is explained


@dataclasses.dataclass(frozen=True)
class Importer:
    name: str
    description: str
    scan: Callable[[Path, ImportOptions], Source]


IMPORTERS: Registry[Importer] = Registry("dataset format")


def register_importer(name: str, description: str, scan: Callable[[Path, ImportOptions], Source]) -> None:
    """Register a dataset format under ``name`` (``semla-client import NAME ...``)."""
    IMPORTERS.register(name, Importer(name, description, scan))


def list_importers() -> list[str]:
    return IMPORTERS.names()


# -- scanning -------------------------------------------------------------------------------------
def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _need_dir(path: Path, root: Path, hint: str) -> Path:
    if not path.is_dir():
        raise InvalidInputError(f"{_rel(path, root)} is not a directory under {root} (expected {hint})")
    return path


def _safe_part(value: str, what: str) -> str:
    """A folder name from the command line: relative, no '..', no backslash."""
    if not value or value.startswith("/") or "\\" in value or ".." in Path(value).parts:
        raise InvalidInputError(f"{what} {value!r} must be a relative folder name without '..'")
    return value


def _lut(mapping: dict[int, int], size: int, default: int = IGNORE_INDEX) -> np.ndarray:
    """Label value → class index (255 ignore; -1 a value the format does not allow)."""
    lut = np.full(size, default, dtype=np.int16)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def _pair_by_stem(img_root: Path, lbl_root: Path, root: Path, what: str) -> list[tuple[Path, Path]]:
    """Every image in ``img_root`` (sorted) with ``lbl_root/<stem>.png``; the first gap is an error."""
    images = sorted(p for p in img_root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InvalidInputError(f"no images (.png, .jpg) in {_rel(img_root, root)}")
    pairs, seen = [], {}
    for image in images:
        if image.stem in seen:
            raise InvalidInputError(f"{_rel(image, root)} and {_rel(seen[image.stem], root)} share one {what} name")
        seen[image.stem] = image
        label = lbl_root / f"{image.stem}.png"
        if not label.is_file():
            raise InvalidInputError(f"image {_rel(image, root)} has no {what} {_rel(label, root)}")
        pairs.append((image, label))
    return pairs


def _scan_cityscapes(root: Path, opts: ImportOptions) -> Source:
    split = opts.split or "train"
    images_dir, labels_dir = opts.images_dir or "leftImg8bit", opts.labels_dir or "gtFine"
    image_suffix, label_suffix = opts.image_suffix or "_leftImg8bit.png", opts.label_suffix or "_gtFine_labelIds.png"
    for value, what in ((split, "--split"), (images_dir, "--images-dir"), (labels_dir, "--labels-dir")):
        _safe_part(value, what)
    for value, what in ((image_suffix, "--image-suffix"), (label_suffix, "--label-suffix")):
        if "/" in value or "\\" in value or not value:
            raise InvalidInputError(f"{what} {value!r} must be a file name ending")
    img_root = _need_dir(root / images_dir / split, root, f"{images_dir}/{split}/<city>/*{image_suffix}")
    lbl_root = _need_dir(root / labels_dir / split, root, f"{labels_dir}/{split}/<city>/*{label_suffix}")
    pairs = []
    for image in sorted(p for p in img_root.rglob(f"*{image_suffix}") if p.is_file()):
        rel = image.relative_to(img_root)
        label = lbl_root / rel.parent / (rel.name[: -len(image_suffix)] + label_suffix)
        if not label.is_file():
            raise InvalidInputError(f"image {_rel(image, root)} has no label {_rel(label, root)}")
        pairs.append((image, label))
    if not pairs:
        raise InvalidInputError(f"no *{image_suffix} images under {_rel(img_root, root)}")
    return Source(list(CITYSCAPES_CLASSES), pairs, _lut(CITYSCAPES_TRAIN_IDS, _CITYSCAPES_MAX_ID + 1),
                  f"a Cityscapes labelId (0..{_CITYSCAPES_MAX_ID}): is it a *_labelIds.png?")


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def _scan_ade20k(root: Path, opts: ImportOptions) -> Source:
    split = opts.split or "train"
    if split not in _ADE_SPLITS:
        raise InvalidInputError(f"ade20k has splits train (training) and val (validation), not {split!r}")
    sub = _ADE_SPLITS[split]
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    images_dir, labels_dir = opts.images_dir or "images", opts.labels_dir or "annotations"
    _safe_part(images_dir, "--images-dir")
    _safe_part(labels_dir, "--labels-dir")
    img_root = _need_dir(root / images_dir / sub, root, f"ADEChallengeData2016/{images_dir}/{sub}/*.jpg")
    lbl_root = _need_dir(root / labels_dir / sub, root, f"ADEChallengeData2016/{labels_dir}/{sub}/*.png")
    pairs = _pair_by_stem(img_root, lbl_root, root, "annotation")
    return Source(list(ADE20K_CLASSES), pairs, _lut({k: k - 1 for k in range(1, 151)}, 151),
                  "an ADE20K class (0..150): is it an annotations/*.png of ADEChallengeData2016?")


def _scan_folder(root: Path, opts: ImportOptions) -> Source:
    from semla.registry.data import read_classes

    images_dir, labels_dir = opts.images_dir or "images", opts.labels_dir or "masks"
    _safe_part(images_dir, "--images-dir")
    _safe_part(labels_dir, "--labels-dir")
    img_root, lbl_root = root / images_dir, root / labels_dir
    if opts.split:
        _safe_part(opts.split, "--split")
        img_root, lbl_root = img_root / opts.split, lbl_root / opts.split
    _need_dir(img_root, root, "a folder of images")
    _need_dir(lbl_root, root, "a folder of masks, one <image stem>.png per image")
    classes = read_classes(opts.classes if opts.classes is not None else root / "classes.txt")
    pairs = _pair_by_stem(img_root, lbl_root, root, "mask")
    stems = {image.stem for image, _ in pairs}
    for mask in sorted(lbl_root.iterdir()):
        if mask.is_file() and mask.stem not in stems:
            raise InvalidInputError(f"mask {_rel(mask, root)} has no image of the same name in {_rel(img_root, root)}")
    lut = _lut({i: i for i in range(len(classes))} | {IGNORE_INDEX: IGNORE_INDEX}, IGNORE_INDEX + 1, default=-1)
    return Source(classes, pairs, lut, f"a class index of the class list (0..{len(classes) - 1}) or 255 (ignore)")


register_importer("cityscapes", "leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/"
                  "*_gtFine_labelIds.png, 19 evaluation classes (ACDC and the like via --images-dir/--labels-dir/"
                  "--image-suffix/--label-suffix)", _scan_cityscapes)
register_importer("ade20k", "ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/.../*.png, "
                  "150 classes (0 = other, ignored)", _scan_ade20k)
register_importer("folder", "ROOT/images/* + ROOT/masks/<stem>.png (class indices, 255 = ignore) + "
                  "ROOT/classes.txt (or --classes FILE)", _scan_folder)


# -- converting -----------------------------------------------------------------------------------
def _open(path: Path, root: Path, what: str) -> Image.Image:
    """Open an image file lazily, refusing huge files and pixel counts before decoding."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidInputError(f"{what} {_rel(path, root)} is larger than {MAX_FILE_BYTES} bytes")
        img = Image.open(path)
    except InvalidInputError:
        raise  # our own refusal (also a ValueError) keeps its message and code
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {_rel(path, root)} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"cannot read {what} {_rel(path, root)}: {exc.__class__.__name__}") from None
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise InvalidInputError(f"{what} {_rel(path, root)} has {img.width}x{img.height} pixels; "
                                f"at most {MAX_PIXELS} are accepted")
    return img


def _read_pair(image: Path, label: Path, source: Source, root: Path, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: RGB uint8 (H, W, 3) and class indices uint8 (H, W), checked and mapped."""
    try:
        with _open(image, root, "image") as img:
            rgb = img.convert("RGB")
        with _open(label, root, "label") as lbl:
            if lbl.mode not in ("L", "P", "I", "I;16"):
                raise InvalidInputError(f"label {_rel(label, root)} has mode {lbl.mode}; expected one value per "
                                        "pixel (a colour-coded mask cannot be read as classes)")
            values = np.asarray(lbl, dtype=np.int64)
    except InvalidInputError:
        raise  # our own refusal (also a ValueError) keeps its message and code
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"cannot decode {_rel(image, root)} or {_rel(label, root)}: "
                                f"{exc.__class__.__name__}") from None
    if values.shape != (rgb.height, rgb.width):
        raise InvalidInputError(f"label {_rel(label, root)} is {values.shape[1]}x{values.shape[0]}, "
                                f"image {_rel(image, root)} is {rgb.width}x{rgb.height}")
    bad = (values < 0) | (values >= len(source.lut))
    mapped = np.where(bad, -1, source.lut[np.clip(values, 0, len(source.lut) - 1)])
    if (mapped < 0).any():
        value = int(values[mapped < 0].flat[0])
        raise InvalidInputError(f"label {_rel(label, root)} holds value {value}, not {source.what}")
    mask = Image.fromarray(mapped.astype(np.uint8), mode="L")
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb, mask = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=None), mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(rgb, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)


def _png(array: np.ndarray, mode: str) -> bytes:
    """A plain PNG of the pixels alone: no EXIF, text chunks, ICC profile or timestamps."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class ImportResult:
    out: Path
    images: int
    classes: list[str]


def import_dataset(
    fmt: str,
    root: Path | str,
    out: Path | str,
    options: ImportOptions = ImportOptions(),
    *,
    limit: int | None = None,
    max_side: int | None = None,
    domain: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Convert a dataset tree into a private-data folder at ``out`` (written whole or not at all).

    Args:
        fmt: a registered format (see :func:`list_importers`).
        limit: import only the first N pairs (in sorted path order); every image's pairing is still checked.
        max_side: shrink images (bilinear) and masks (nearest) whose longer side exceeds this.
        domain: written to ``domain.json``, which ``train`` publishes as the adapter's domain.

    Raises:
        InvalidInputError: unknown format, bad options, ``out`` not empty, or the first missing
            or mismatched file of the tree.
    """
    importer = IMPORTERS.lookup(fmt)
    if limit is not None and limit < 1:
        raise InvalidInputError("--limit must be >= 1")
    if max_side is not None and not 16 <= max_side <= 16384:
        raise InvalidInputError("--max-side must lie in 16..16384")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise InvalidInputError(f"dataset root {root} is not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"{out} exists and is not an empty directory; choose a new --out")
    source = importer.scan(root, options)
    pairs = source.pairs[:limit] if limit is not None else source.pairs
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i, (image, label) in enumerate(tqdm(pairs, desc=f"import {fmt}", unit="img", disable=not progress,
                                                mininterval=1.0)):
            rgb, mask = _read_pair(image, label, source, root, max_side)
            (tmp / "images" / f"{i:05d}.png").write_bytes(_png(rgb, "RGB"))
            (tmp / "masks" / f"{i:05d}.png").write_bytes(_png(mask, "L"))
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in source.classes), encoding="utf-8")
        if domain is not None:
            (tmp / "domain.json").write_text(json.dumps({"domain": domain}) + "\n", encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out=out, images=len(pairs), classes=source.classes)


# -- the command ----------------------------------------------------------------------------------
def _import_command(args: argparse.Namespace) -> int:
    options = ImportOptions(split=args.split, images_dir=args.images_dir, labels_dir=args.labels_dir,
                            image_suffix=args.image_suffix, label_suffix=args.label_suffix, classes=args.classes)
    result = import_dataset(args.format, args.root, args.out, options, limit=args.limit, max_side=args.max_side,
                            domain=args.domain, progress=True)
    print(f"wrote {result.images} images and masks ({len(result.classes)} classes) to {result.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``semla-client import`` on an ``add_subparsers()`` object."""
    formats = "\n".join(f"  {name:11s} {IMPORTERS[name].description}" for name in list_importers())
    p = subparsers.add_parser(
        "import", help="convert a Cityscapes-, ADE20K- or folder-layout data set into a training folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write DIR/images/00000.png, DIR/masks/00000.png (class index per pixel, 255 = ignore)\n"
                    "and DIR/classes.txt, which `semla-client train --data DIR` reads unchanged. Only the chosen\n"
                    "images and masks are copied, re-encoded as plain PNG (no EXIF or other metadata) under\n"
                    "numbered names: no source path reaches the folder or the bundle. A bad tree gets one error\n"
                    "naming the first missing or mismatched file, and nothing is written.\n\n"
                    f"Formats:\n{formats}\n\n"
                    "ACDC (fog, night, rain, snow) loads as cityscapes:\n"
                    "  semla-client import cityscapes ACDC --split train --images-dir rgb_anon/fog --labels-dir gt/fog \\\n"
                    "      --image-suffix _rgb_anon.png --label-suffix _gt_labelIds.png --out ./acdc-fog")
    p.add_argument("format", choices=list_importers(), metavar="FORMAT", help=f"one of: {', '.join(list_importers())}")
    p.add_argument("root", type=Path, metavar="ROOT", help="the data set's root folder")
    p.add_argument("--out", type=Path, required=True, help="training folder to create (must not exist or be empty)")
    p.add_argument("--split", help="split folder: cityscapes train|val|test (default train), ade20k train|val "
                                   "(default train), folder: images/<split> and masks/<split> (default none)")
    p.add_argument("--limit", type=int, help="import only the first N images (sorted by path)")
    p.add_argument("--max-side", type=int, help="shrink images (bilinear) and masks (nearest) to this longer side")
    p.add_argument("--domain", help="domain description for the adapter (domain.json; train publishes it)")
    p.add_argument("--images-dir", help="image folder under ROOT (cityscapes: leftImg8bit, ade20k: images, "
                                        "folder: images)")
    p.add_argument("--labels-dir", help="label folder under ROOT (cityscapes: gtFine, ade20k: annotations, "
                                        "folder: masks)")
    p.add_argument("--image-suffix", help="cityscapes layout: image file ending (default _leftImg8bit.png)")
    p.add_argument("--label-suffix", help="cityscapes layout: label file ending (default _gtFine_labelIds.png)")
    p.add_argument("--classes", type=Path, help="folder format: class list file (default ROOT/classes.txt)")
    p.set_defaults(func=_import_command)
    return p
