"""Odd and broken images: converted when possible, skipped and listed when not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import extract_features, pattern_image
from extract import store
from extract.errors import UserError
from extract.preprocess import to_uint8

TRAIN = "train/n01443537/images"


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_every_image_mode_becomes_rgb(mode):
    rgb = pattern_image(0, 0)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    else:
        image = rgb.convert(mode)
    pixels = to_uint8(image)
    assert pixels.shape == (3, 224, 224)
    expected = to_uint8(image.convert("RGB")) if mode != "I;16" else to_uint8(rgb.convert("L"))
    assert np.abs(pixels.int().numpy() - expected.int().numpy()).max() <= 1


def test_converted_modes_are_extracted(tiny_imagenet, tmp_path):
    folder = tiny_imagenet / TRAIN
    pattern_image(0, 7).convert("L").save(folder / "gray.JPEG")
    pattern_image(0, 8).convert("CMYK").save(folder / "cmyk.JPEG")
    pattern_image(0, 9).convert("RGBA").save(folder / "rgba.png")
    pattern_image(0, 10).convert("P").save(folder / "palette.gif")
    out = extract_features(tiny_imagenet, tmp_path / "f.h5", splits=["train"])
    with store.open_complete(out) as file:
        paths = store.read_split(file, "train").paths
        assert {
            f"{TRAIN}/{n}" for n in ("gray.JPEG", "cmyk.JPEG", "rgba.png", "palette.gif")
        } <= set(paths)
        assert store.read_failed(file, "train") == []


def write_broken_files(folder):
    good = folder / "n01443537_0.JPEG"
    (folder / "truncated.JPEG").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image")
    return {f"{TRAIN}/{name}" for name in ("truncated.JPEG", "empty.JPEG", "text.JPEG")}


def test_unreadable_files_are_skipped_and_listed(tiny_imagenet, tmp_path):
    broken = write_broken_files(tiny_imagenet / TRAIN)
    out = extract_features(tiny_imagenet, tmp_path / "f.h5", splits=["train"])
    with store.open_complete(out) as file:
        failed = dict(store.read_failed(file, "train"))
        arrays = store.read_split(file, "train")
    assert set(failed) == broken
    assert all(reason for reason in failed.values())
    assert len(arrays.paths) == 12 and not broken & set(arrays.paths)
    assert arrays.features.shape == (12, 4096) and len(arrays.labels) == 12


def test_strict_refuses_before_writing_anything(tiny_imagenet, tmp_path):
    write_broken_files(tiny_imagenet / TRAIN)
    out = tmp_path / "f.h5"
    with pytest.raises(UserError, match="unreadable image"):
        extract_features(tiny_imagenet, out, splits=["train"], strict=True)
    assert not out.exists() and not store.part_path(out).exists()
