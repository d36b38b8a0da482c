"""Dataset importers: each format on a tiny tree the test writes, label mapping, what is (not)
copied, clear errors for bad trees, and a training run plus audit on an imported folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from semla.client.importers import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    ImportOptions,
    import_dataset,
    list_importers,
)
from semla.registry.data import load_dataset
from semla.schemas.errors import InvalidInputError

SECRET = "SecretCam-4711"


def rgb(seed: int, h: int = 24, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray, mode: str | None = None, *, text: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("Source", f"{SECRET} {path}")
    Image.fromarray(array, mode=mode).save(path, pnginfo=info)


#: Cityscapes labelIds in the fixture and the trainIds they must become (0 unlabeled, 4 static: ignored).
CS_IDS = np.array([7, 8, 26, 23, 0, 4, 33, 24])
CS_TRAIN = np.array([0, 1, 13, 10, 255, 255, 18, 11])


def cs_label(seed: int, h: int = 24, w: int = 48) -> np.ndarray:
    return CS_IDS[np.random.default_rng(seed).integers(0, len(CS_IDS), (h, w))].astype(np.uint8)


def write_cityscapes(root: Path, n: int = 3, *, images: str = "leftImg8bit", labels: str = "gtFine",
                     img_suffix: str = "_leftImg8bit.png", lbl_suffix: str = "_gtFine_labelIds.png",
                     size: tuple[int, int] = (24, 48)) -> list[str]:
    cities = ["aachen", "bremen"]
    stems = []
    for i in range(n):
        city = cities[i % 2]
        stem = f"{city}_{i:06d}_000019"
        save_png(root / images / "train" / city / f"{stem}{img_suffix}", rgb(i, *size), text=True)
        save_png(root / labels / "train" / city / f"{stem}{lbl_suffix}", cs_label(i, *size))
        save_png(root / labels / "train" / city / f"{stem}_gtFine_color.png", rgb(100 + i, *size))  # not read
        stems.append(stem)
    return stems


def write_ade(root: Path, n: int = 3) -> Path:
    base = root / "ADEChallengeData2016"
    for i in range(n):
        img = base / "images" / "training" / f"ADE_train_{i + 1:08d}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif[0x010F] = SECRET  # Make
        Image.fromarray(rgb(i)).save(img, exif=exif.tobytes(), quality=95)
        label = np.random.default_rng(i).integers(0, 151, (24, 48)).astype(np.uint8)
        label[0, :3] = [0, 1, 150]
        save_png(base / "annotations" / "training" / f"ADE_train_{i + 1:08d}.png", label)
    return base


def write_folder(root: Path, n: int = 3, classes: tuple[str, ...] = ("sky", "road", "car")) -> Path:
    for i in range(n):
        save_png(root / "images" / f"shot-{i}.png", rgb(i), text=True)
        mask = np.random.default_rng(i).integers(0, len(classes), (24, 48)).astype(np.uint8)
        mask[:2, :2] = 255
        save_png(root / "masks" / f"shot-{i}.png", mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_formats_are_registered_and_listed_in_help():
    assert list_importers() == ["ade20k", "cityscapes", "folder"]
    help_text = subprocess.run([str(Path(sys.executable).parent / "semla-client"), "import", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert all(name in help_text for name in list_importers())


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path):
    root = tmp_path / "cs"
    stems = write_cityscapes(root)
    result = import_dataset("cityscapes", root, tmp_path / "out", ImportOptions(split="train"))
    assert result.images == 3 and result.classes == list(CITYSCAPES_CLASSES) and len(result.classes) == 19
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "images", "masks"]
    data = load_dataset(out)
    lut = dict(zip(CS_IDS.tolist(), CS_TRAIN.tolist()))
    for i, stem in enumerate(sorted(stems)):  # sorted by path: aachen first, then bremen
        seed = int(stem.split("_")[1])
        assert (data.images[i] == rgb(seed)).all()
        assert (data.masks[i] == np.vectorize(lut.get)(cs_label(seed))).all()
    for png in out.rglob("*.png"):
        raw = png.read_bytes()
        assert SECRET.encode() not in raw and b"tEXt" not in raw and b"eXIf" not in raw and str(root).encode() not in raw


def test_acdc_layout_loads_through_the_cityscapes_options(tmp_path):
    root = tmp_path / "acdc"
    write_cityscapes(root, 2, images="rgb_anon/fog", labels="gt/fog", img_suffix="_rgb_anon.png",
                     lbl_suffix="_gt_labelIds.png")
    opts = ImportOptions(split="train", images_dir="rgb_anon/fog", labels_dir="gt/fog",
                         image_suffix="_rgb_anon.png", label_suffix="_gt_labelIds.png")
    assert import_dataset("cityscapes", root, tmp_path / "out", opts).images == 2
    with pytest.raises(InvalidInputError, match=r"leftImg8bit/train is not a directory"):
        import_dataset("cityscapes", root, tmp_path / "out2")


def test_ade20k_shifts_classes_and_drops_exif(tmp_path):
    base = write_ade(tmp_path)
    result = import_dataset("ade20k", tmp_path, tmp_path / "out", ImportOptions(split="train"))
    assert result.images == 3 and len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    out = tmp_path / "out"
    assert (out / "classes.txt").read_text().splitlines() == list(ADE20K_CLASSES)
    mask = np.asarray(Image.open(out / "masks" / "00000.png"))
    src = np.asarray(Image.open(base / "annotations" / "training" / "ADE_train_00000001.png")).astype(int)
    assert mask[0, :3].tolist() == [255, 0, 149]
    assert (mask == np.where(src == 0, 255, src - 1)).all()
    decoded = np.asarray(Image.open(base / "images" / "training" / "ADE_train_00000001.jpg").convert("RGB"))
    image = Image.open(out / "images" / "00000.png")
    assert image.format == "PNG" and not image.info.get("exif") and (np.asarray(image) == decoded).all()
    assert all(SECRET.encode() not in p.read_bytes() for p in out.rglob("*.png"))
    # the root may also be ADEChallengeData2016 itself
    assert import_dataset("ade20k", base, tmp_path / "out2", ImportOptions(split="train"), limit=2).images == 2


def test_folder_format_with_limit_max_side_and_domain(tmp_path):
    root = write_folder(tmp_path / "mine", n=4)
    result = import_dataset("folder", root, tmp_path / "out", limit=3, max_side=24, domain="my street cams")
    assert result.images == 3
    data = load_dataset(tmp_path / "out")
    assert data.classes == ["sky", "road", "car"] and data.images[0].shape == (12, 24, 3)
    assert data.masks[0][0, 0] == 255 and set(np.unique(data.masks[0])) <= {0, 1, 2, 255}
    assert json.loads((tmp_path / "out" / "domain.json").read_text()) == {"domain": "my street cams"}
    assert not any("shot" in p.name for p in (tmp_path / "out").rglob("*"))


def first_label(root: Path) -> Path:
    return sorted(root.rglob("*_gtFine_labelIds.png"))[0]


def _missing_label(root):
    first_label(root).unlink()


def _label_size(root):
    save_png(first_label(root), np.zeros((5, 5), np.uint8))


def _instance_ids(root):  # 16-bit instance ids where label ids belong
    Image.fromarray(np.full((24, 48), 26001, np.uint16)).save(first_label(root))


def _colour_label(root):
    save_png(first_label(root), rgb(9))


def _corrupt_image(root):
    sorted(root.rglob("*_leftImg8bit.png"))[-1].write_bytes(b"\x89PNG not really")


@pytest.mark.parametrize("breakage, message", [
    (_missing_label, r"image leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png has no label "
                     r"gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"),
    (_label_size, r"label gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png is 5x5, image .* is 48x24"),
    (_instance_ids, r"holds value 26001, not a Cityscapes labelId"),
    (_colour_label, r"has mode RGB"),
    (_corrupt_image, r"cannot read image leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png"),
])
def test_bad_cityscapes_trees_name_the_first_bad_file_and_write_nothing(tmp_path, breakage, message):
    root = tmp_path / "cs"
    write_cityscapes(root)
    breakage(root)
    with pytest.raises(InvalidInputError, match=message):
        import_dataset("cityscapes", root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt, breakage, message", [
    ("ade20k", lambda r: next(r.rglob("ADE_train_00000002.png")).unlink(),
     r"images/training/ADE_train_00000002.jpg has no annotation annotations/training/ADE_train_00000002.png"),
    ("ade20k", lambda r: save_png(next(r.rglob("ADE_train_00000001.png")), np.full((24, 48), 151, np.uint8)),
     r"holds value 151, not an ADE20K class"),
    ("folder", lambda r: save_png(r / "masks" / "extra.png", np.zeros((24, 48), np.uint8)),
     r"mask masks/extra.png has no image"),
    ("folder", lambda r: save_png(r / "masks" / "shot-1.png", np.full((24, 48), 3, np.uint8)),
     r"label masks/shot-1.png holds value 3, not a class index of the class list \(0..2\) or 255"),
    ("folder", lambda r: (r / "classes.txt").unlink(), r"classes.txt is missing"),
    ("folder", lambda r: (r / "masks" / "shot-0.png").unlink(), r"image images/shot-0.png has no mask masks/shot-0.png"),
])
def test_bad_ade20k_and_folder_trees_are_refused_clearly(tmp_path, fmt, breakage, message):
    root = tmp_path / "src"
    (write_ade if fmt == "ade20k" else write_folder)(root)
    breakage(root)
    with pytest.raises(InvalidInputError, match=message):
        import_dataset(fmt, root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_refuses_a_non_empty_out_unknown_format_and_escaping_options(tmp_path):
    root = write_folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        import_dataset("folder", root, tmp_path / "out")
    with pytest.raises(InvalidInputError, match="valid: ade20k, cityscapes, folder"):
        import_dataset("voc", root, tmp_path / "o2")
    with pytest.raises(InvalidInputError, match=r"'\.\.'"):
        import_dataset("folder", root, tmp_path / "o3", ImportOptions(images_dir="../elsewhere"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_imported_cityscapes_trains_unchanged_and_the_bundle_shows_no_source_path(tmp_path, tiny_base):
    from semla.client.audit import audit_bundle
    from semla.registry.train import TrainConfig, train_adapter

    root = tmp_path / "Cityscapes-private-hamburg"
    stems = write_cityscapes(root, 50, size=(32, 64))
    data = tmp_path / "data"
    assert import_dataset("cityscapes", root, data, ImportOptions(split="train")).images == 50

    bundle = tmp_path / "bundle"
    manifest = train_adapter(data, bundle, "cs", TrainConfig(steps=2, batch_size=4), base=tiny_base, progress=False)
    assert manifest.sample_count == 50 and manifest.vocabulary == list(CITYSCAPES_CLASSES)
    report = audit_bundle(bundle)
    text = json.dumps(report.to_json()) + "".join(p.read_bytes().decode("latin-1") for p in bundle.iterdir())
    for leak in [str(root), root.name, "aachen", "bremen", "leftImg8bit", "gtFine", stems[0], SECRET]:
        assert leak not in text, leak
    assert report.ok, report.flags


def test_training_ignores_255_and_an_all_ignored_batch_gives_zero_loss(tiny_base):
    import torch
    import torch.nn.functional as F

    from semla.registry.train import segmentation_loss

    pixels = tiny_base.pixels([rgb(0, 96, 96), rgb(1, 96, 96)])
    text = tiny_base.encode_classes(["road", "sky"])
    masks = torch.ones(2, 96, 96, dtype=torch.long)
    masks[:, :48] = 255  # the top half is ignored
    with torch.no_grad():
        loss = segmentation_loss(tiny_base, pixels, masks, text)
        bottom = F.cross_entropy(tiny_base(pixels, text)[..., 48:, :], masks[:, 48:])
        none = segmentation_loss(tiny_base, pixels, torch.full_like(masks, 255), text)
    assert loss.item() == pytest.approx(bottom.item(), rel=1e-5)
    assert none.item() == 0.0  # not the NaN of an empty mean
