"""Odd and broken images: converted when possible, skipped and listed when not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import extract_features, pattern_image
from extract import store
from extract.backbone import default_preprocess
from extract.errors import UserError
from extract.preprocess import decode, to_uint8

TRAIN = "train/n01443537/images"


def mode_cases() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Per PIL mode, an image built from random values and the RGB pixels it stands for,
    worked out from the mode's definition (not by asking PIL to convert it)."""
    rng = np.random.default_rng(0)
    shape = (24, 32)
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (*shape, 4), dtype=np.uint8).astype(np.int64)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, shape, dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette(palette.tobytes())
    transparent = palette_image.copy()
    transparent.info["transparency"] = int(indices[0, 0])
    bits = rng.integers(0, 2, shape).astype(bool)
    # 16-bit: the 8-bit gray in the high byte, noise below half a level in the low byte; a
    # conversion that clips at 255 instead of scaling gives white almost everywhere.
    noise = rng.integers(0, 128, shape) * (gray < 255)
    sixteen = (gray.astype(np.uint16) * 257 + noise).astype(np.uint16)

    def mapped(values: dict[float, int], dtype) -> tuple[np.ndarray, np.ndarray]:
        """Pixels drawn from `values` and the 8-bit level each stands for."""
        chosen = rng.choice(list(values), shape).astype(dtype)
        expected = np.vectorize(lambda v: values[float(v)])(chosen)
        return chosen, np.stack([expected] * 3, axis=-1)

    # Whole-range images: at most 255 is read as 8 bits, anything above as 16 bits.
    eight_bit, eight_bit_rgb = mapped({0: 0, 128: 128, 200: 200, 255: 255}, np.int32)
    dark, dark_rgb = mapped({0: 0, 100: 0, 200: 1, 256: 1}, np.uint16)
    # 16-bit levels go to the nearest 8-bit level: 257 * n + 128 is just below n + 1/2.
    halves, halves_rgb = mapped({0: 0, 51528: 200, 51529: 201, 65535: 255}, np.uint16)
    # Float pixels are rounded to the nearest level, and clipped below at 0.
    floats, floats_rgb = mapped(
        {-20.0: 0, 10.25: 10, 10.75: 11, 127.5: 128, 255.0: 255}, np.float32
    )
    # 32-bit and float values past 16 bits are white, not wrapped round to dark by the cast.
    wide, wide_rgb = mapped({0: 0, 32896: 128, 70000: 255, 2**31 - 1: 255}, np.int32)
    huge, huge_rgb = mapped({0.0: 0, 32896.0: 128, 1e6: 255}, np.float32)
    return {
        "L": (Image.fromarray(gray, mode="L"), np.stack([gray] * 3, axis=-1)),
        "RGBA": (Image.fromarray(rgba, mode="RGBA"), rgba[..., :3]),  # alpha dropped
        "CMYK": (
            Image.fromarray(cmyk.astype(np.uint8), mode="CMYK"),
            np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255),
        ),
        "P": (palette_image, palette[indices]),
        "P+transparency": (transparent, palette[indices]),
        "1": (Image.fromarray(bits).convert("1"), np.stack([bits * 255] * 3, axis=-1)),
        "I;16": (Image.fromarray(sixteen), np.stack([gray] * 3, axis=-1)),
        "I": (Image.fromarray(sixteen.astype(np.int32)), np.stack([gray] * 3, axis=-1)),
        "I+8-bit range": (Image.fromarray(eight_bit), eight_bit_rgb),
        "I;16+max 256": (Image.fromarray(dark), dark_rgb),
        "I;16+rounding": (Image.fromarray(halves), halves_rgb),
        "F": (Image.fromarray(floats), floats_rgb),
        "I+above 16 bits": (Image.fromarray(wide), wide_rgb),
        "F+1e6": (Image.fromarray(huge), huge_rgb),
        **{
            mode: (
                Image.frombytes(mode, shape[::-1], sixteen.astype(order).tobytes()),
                np.stack([gray] * 3, axis=-1),
            )
            for mode, order in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2"))
        },
    }


@pytest.mark.parametrize("mode", list(mode_cases()))
def test_every_image_mode_becomes_rgb(mode):
    image, expected = mode_cases()[mode]
    assert image.mode == mode.split("+")[0]
    pixels = decode(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 32)
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected.astype(np.uint8))
    assert to_uint8(image, default_preprocess()).shape == (3, 224, 224)


def test_16_bit_images_are_extracted_as_their_8_bit_content(tiny_imagenet, tmp_path):
    """A 16-bit PNG goes through a whole extraction and gets the features of the same picture
    in 8 bits, not those of PIL's clipping conversion (white almost everywhere)."""
    folder = tiny_imagenet / TRAIN
    gray = np.asarray(pattern_image(0, 11).convert("L"))
    sixteen = gray.astype(np.uint16) * 257
    Image.fromarray(gray, mode="L").save(folder / "gray8.png")
    Image.fromarray(sixteen).save(folder / "gray16.png")
    Image.fromarray(sixteen).convert("RGB").save(folder / "clipped.png")
    assert Image.open(folder / "gray16.png").mode == "I;16"
    out = extract_features(tiny_imagenet, tmp_path / "f.h5", splits=["train"])
    with store.open_complete(out) as file:
        split = store.read_split(file, "train")
        assert store.read_failed(file, "train") == []
    row = {path.rsplit("/", 1)[-1]: features for path, features in zip(split.paths, split.features)}
    np.testing.assert_array_equal(row["gray16.png"], row["gray8.png"])
    assert np.abs(row["clipped.png"].astype(np.float32) - row["gray8.png"]).max() > 0.01


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


def test_32_bit_and_float_values_past_16_bits_are_white_and_not_wrapped():
    """Mode I at 70000 and 2**31-1, mode F at 1e6: each 255 (CPU, exact)."""
    from extract.preprocess import to_rgb

    for mode, values in (("I", [0, 70000, 2**31 - 1]), ("F", [0.0, 1e6, 1e6])):
        dtype = np.int32 if mode == "I" else np.float32
        image = Image.fromarray(np.asarray([values], dtype=dtype))
        assert image.mode == mode
        assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255, 255]
    # Negative control: without the clip the cast wraps 70000 round to a dark level.
    assert np.asarray(70000 / 65535 * 255 + 0.5).astype(np.uint8) == 16
