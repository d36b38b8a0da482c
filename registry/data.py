"""Reading a data owner's private training folder, with one-line errors for every bad input.

Layout: ``DIR/images/*.png|jpg``, ``DIR/masks/<same stem>.png`` (class index per pixel, 255 =
ignore) and ``DIR/classes.txt`` (one class name per line, line i = index i).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semla.schemas.errors import InvalidInputError

__all__ = ["Dataset", "IGNORE_INDEX", "IMAGE_SUFFIXES", "load_dataset", "scan_dataset", "read_image", "read_classes", "miou"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass
class Dataset:
    images: list[np.ndarray]  # uint8 (H, W, 3)
    masks: list[np.ndarray]  # uint8 (H, W)
    classes: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3).

    Raises:
        InvalidInputError: missing or unreadable.
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise InvalidInputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"cannot read image {path}: {exc.__class__.__name__}") from None


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise InvalidInputError(f"{path} is missing (one class name per line)")
    classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes:
        raise InvalidInputError(f"{path} lists no class names")
    if len(set(classes)) != len(classes):
        raise InvalidInputError(f"{path} lists a class name twice")
    if len(classes) >= IGNORE_INDEX:
        raise InvalidInputError(f"{path} lists {len(classes)} classes; at most {IGNORE_INDEX - 1} are supported")
    return classes


def scan_dataset(root: Path, *, min_samples: int = 1) -> tuple[list[str], list[Path]]:
    """The class names and image paths of a training folder, checked without reading any image.

    Cheap enough for a command line to call before it loads a model.

    Raises:
        InvalidInputError: no such folder, no images/ or masks/, a bad classes.txt, too few images.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"data directory {root} does not exist")
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise InvalidInputError(f"{root} has no images/ directory")
    if not mask_dir.is_dir():
        raise InvalidInputError(f"{root} has no masks/ directory (one class-index PNG per image)")
    classes = read_classes(root / "classes.txt")
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < min_samples:
        raise InvalidInputError(
            f"{image_dir} holds {len(paths)} images; at least {min_samples} are required "
            "(the minimum sample count before a centroid may be published)"
        )
    return classes, paths


def load_dataset(root: Path, *, min_samples: int = 1, limit: int | None = None) -> Dataset:
    """Load and validate a training folder.

    Raises:
        InvalidInputError: naming the first problem: no images/ or masks/, an image without its
            mask, an unreadable file, too few images, a mask whose size or class indices do not
            match its image or classes.txt.
    """
    classes, paths = scan_dataset(root, min_samples=min_samples)
    mask_dir = Path(root) / "masks"
    if limit is not None:
        paths = paths[:limit]
    data = Dataset([], [], classes, [])
    for path in paths:
        mask_path = mask_dir / f"{path.stem}.png"
        if not mask_path.is_file():
            raise InvalidInputError(f"image {path.name} has no mask {mask_path}")
        image = read_image(path)
        try:
            with Image.open(mask_path) as m:
                if m.mode not in ("L", "P", "I", "I;16"):
                    raise InvalidInputError(f"mask {mask_path} has mode {m.mode}; expected one class index per pixel")
                mask = np.asarray(m, dtype=np.int64)
        except InvalidInputError:
            raise  # our own refusal (also a ValueError) keeps its message and code
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"cannot read mask {mask_path}: {exc.__class__.__name__}") from None
        if mask.shape != image.shape[:2]:
            raise InvalidInputError(f"mask {mask_path.name} is {mask.shape[::-1]}, image is {image.shape[1::-1]}")
        bad = mask[(mask != IGNORE_INDEX) & (mask >= len(classes))]
        if bad.size:
            raise InvalidInputError(
                f"mask {mask_path.name} holds class index {int(bad.max())} but classes.txt lists {len(classes)} classes"
            )
        data.images.append(image)
        data.masks.append(mask.astype(np.uint8))
        data.names.append(path.stem)
    return data


def miou(preds: list[np.ndarray], masks: list[np.ndarray], n_classes: int) -> float:
    """Mean IoU over classes present in prediction or ground truth, accumulated over the set."""
    inter = np.zeros(n_classes, dtype=np.int64)
    union = np.zeros(n_classes, dtype=np.int64)
    for pred, mask in zip(preds, masks):
        valid = mask != IGNORE_INDEX
        p, g = pred[valid].astype(np.int64), mask[valid].astype(np.int64)
        inter += np.bincount(g[p == g], minlength=n_classes)[:n_classes]
        union += (np.bincount(p, minlength=n_classes) + np.bincount(g, minlength=n_classes))[:n_classes]
    union -= inter
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()) if seen.any() else 0.0
