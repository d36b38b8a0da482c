"""The training folder reader: every bad input gets one clear error naming the problem."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from semla.registry import synth
from semla.registry.data import load_dataset, miou
from semla.schemas.errors import InvalidInputError


@pytest.fixture
def data(tmp_path):
    return synth.write_dataset("clear", 6, 0, tmp_path / "d", size=32)


def test_valid_folder_loads(data):
    ds = load_dataset(data)
    assert len(ds) == 6 and ds.classes[0] == "sky" and ds.masks[0].shape == (32, 32)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d / "masks"), "no masks/"),
        (lambda d: shutil.rmtree(d / "images"), "no images/"),
        (lambda d: (d / "classes.txt").unlink(), "classes.txt is missing"),
        (lambda d: (d / "images" / "00002.png").write_bytes(b"not a png"), "cannot read image"),
        (lambda d: (d / "masks" / "00003.png").unlink(), "has no mask"),
        (lambda d: (d / "classes.txt").write_text("sky\nroad\n"), "classes.txt lists 2 classes"),
        (lambda d: Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "masks" / "00001.png"), "is (8, 8)"),
    ],
)
def test_bad_folders_name_the_problem(data, breakage, message):
    breakage(data)
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(data)


def test_too_few_images_for_the_privacy_minimum(data):
    with pytest.raises(InvalidInputError, match="at least 50"):
        load_dataset(data, min_samples=50)


def test_miou_counts_classes_present():
    gt = np.array([[0, 0], [1, 1]], np.uint8)
    assert miou([gt], [gt], 3) == 1.0
    pred = np.array([[0, 1], [1, 1]], np.uint8)
    assert miou([pred], [gt], 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
