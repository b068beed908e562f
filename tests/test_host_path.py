"""The fast JPEG path gives PIL's pixels, or leaves the file to PIL: same pixels, same failures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import extract_features, pattern_image
from extract import images, runner, store
from extract.backbone import default_preprocess
from extract.images import decodes_like_pil, read_bytes, read_pixels, read_pixels_with_pil

TRAIN = "train/n01443537/images"


def exif_rotated(image: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": PIL does not apply it on open, nor may we
    image.save(path, exif=exif.tobytes())


def write_corpus(folder: Path) -> dict[str, bool]:
    """Odd and broken files -> whether the torchvision decoder is expected to take them."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = pattern_image(1, 2, size=67).resize((97, 61))
    photo.save(folder / "baseline.jpg", quality=95)
    photo.save(folder / "sub444.jpg", subsampling=0)
    photo.save(folder / "sub422.jpg", subsampling=1)
    photo.save(folder / "progressive.jpg", progressive=True)
    photo.save(folder / "optimized.jpg", optimize=True, quality=40)
    photo.convert("L").save(folder / "gray.jpg")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    exif_rotated(photo, folder / "exif.jpg")
    photo.save(folder / "png_named.jpg", format="PNG")
    good = (folder / "baseline.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "header_only.jpg").write_bytes(good[:300])
    (folder / "trailing_junk.jpg").write_bytes(good + b"not part of the image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "magic_only.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    fast = {"baseline", "sub444", "sub422", "progressive", "optimized", "gray", "exif"}
    fast |= {"truncated", "header_only", "trailing_junk"}  # tried, refused or read alike
    return {path.name: path.stem in fast for path in sorted(folder.iterdir())}


def outcome(read, path: Path) -> tuple[str, torch.Tensor | None]:
    try:
        return "", read(path)
    except Exception as error:
        return images.failure_reason(error), None


def test_fast_decoder_gives_pil_pixels_or_pil_errors_on_every_odd_file(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    for name, takes_fast_path in corpus.items():
        path = tmp_path / "corpus" / name
        assert decodes_like_pil(read_bytes(path)) == takes_fast_path, name
        reason, pixels = outcome(read_pixels, path)
        reference_reason, reference = outcome(read_pixels_with_pil, path)
        assert reason == reference_reason, name
        if reference is None:
            assert pixels is None, name
        else:
            assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3, name
            torch.testing.assert_close(pixels, reference, rtol=0, atol=0, msg=name)


def test_fast_decoder_matches_pil_on_photo_sized_files(tmp_path):
    for quality in (50, 75, 95):
        path = tmp_path / f"photo{quality}.jpg"
        pattern_image(2, quality, size=500).resize((500, 375)).save(path, quality=quality)
        assert decodes_like_pil(read_bytes(path))
        torch.testing.assert_close(read_pixels(path), read_pixels_with_pil(path), rtol=0, atol=0)


def test_oversized_jpeg_goes_to_pil_and_is_refused_as_a_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    pattern_image(0, 1, size=120).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)
    assert not decodes_like_pil(read_bytes(path))
    reason, pixels = outcome(read_pixels, path)
    assert pixels is None and "DecompressionBomb" in reason


def test_header_parser_refuses_what_it_cannot_read():
    jpeg = io.BytesIO()
    pattern_image(0, 0).save(jpeg, format="JPEG")
    data = jpeg.getvalue()
    assert decodes_like_pil(data)
    assert not decodes_like_pil(data[:20])  # ends before the frame header
    assert not decodes_like_pil(b"\xff\xd8\xff\xda\x00\x02" + data[2:])  # scan data first
    assert not decodes_like_pil(b"")


def test_features_of_the_corpus_equal_those_read_through_pil(tmp_path, weights_file, monkeypatch):
    """End to end: the stored rows and the failure list are those of the PIL-only reader."""
    root = tmp_path / "data"
    write_corpus(root / "train" / "odd")
    (root / "train" / "plain").mkdir()
    pattern_image(0, 3).save(root / "train" / "plain" / "a.jpg")
    fast = extract_features(root, tmp_path / "fast.h5", weights=str(weights_file))
    monkeypatch.setattr(
        images, "pixels_of", lambda data, name: images.read_pixels_with_pil(io.BytesIO(data), name)
    )
    slow = extract_features(root, tmp_path / "slow.h5", weights=str(weights_file))
    with store.open_complete(fast) as a, store.open_complete(slow) as b:
        ours, reference = store.read_split(a, "train"), store.read_split(b, "train")
        assert ours.paths == reference.paths
        np.testing.assert_array_equal(ours.features, reference.features)
        assert store.read_failed(a, "train") == store.read_failed(b, "train")
        assert len(store.read_failed(a, "train")) == 5


def test_default_workers_follow_the_device():
    assert runner.default_workers(torch.device("cuda")) == runner.available_cores()
    assert runner.default_workers(torch.device("cpu")) == min(8, runner.available_cores())


def test_device_decoding_without_cuda_is_a_clear_error(tiny_imagenet, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from extract.errors import UserError

    with pytest.raises(UserError, match="--decode device"):
        extract_features(tiny_imagenet, tmp_path / "f.h5", decode="device", device="auto")


def test_a_failed_start_stops_the_early_workers_and_frees_the_lock(tiny_imagenet, tmp_path):
    """The first loader's workers start before the network is built and inherit the lock's
    file; when the build fails they must be gone, even while the caller keeps the error (and
    with it the frames of the failed run), or the lock would outlive the run."""
    import fcntl
    import sys

    from extract.errors import UserError

    out = tmp_path / "f.h5"
    (tmp_path / "broken.pth").write_bytes(b"not a state_dict")
    kept = None
    try:
        extract_features(tiny_imagenet, out, workers=2, weights=str(tmp_path / "broken.pth"))
    except UserError:
        kept = sys.exc_info()
    assert kept is not None and "broken.pth" in str(kept[1])
    with open(out.with_name("f.h5.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a worker still holds it


def test_files_the_device_decoder_refuses_go_to_pil_or_fail_with_pils_reason(tmp_path):
    """`crops_on_device` on the CPU (the same code path as on the GPU, with libjpeg): a bad
    JPEG fails the batched decode; the rest are still decoded, and the bad one is reported
    with the reason the workers would have recorded."""
    from extract.dataset import Manifest
    from extract.images import Collate, ManifestImages, crops_on_device
    from extract.sources import folder_files

    corpus = write_corpus(tmp_path / "corpus")
    names = ["baseline.jpg", "truncated.jpg", "cmyk.jpg", "progressive.jpg", "header_only.jpg"]
    assert all(name in corpus for name in names)
    manifest = Manifest("train", names, [0] * 5, reader=folder_files(tmp_path / "corpus", names))
    files = ManifestImages(manifest, decode="device")
    batch = Collate(default_preprocess(), defer_resize=True, decode="device")(
        [files[i] for i in range(5)]
    )
    assert [tensor.dim() for tensor in batch.unstacked] == [1, 1, 3, 1, 1]
    crops, refused = crops_on_device(batch.unstacked, default_preprocess(), torch.device("cpu"))
    expected_reasons = [
        outcome(read_pixels_with_pil, tmp_path / "corpus" / names[position])[0]
        for position in (1, 4)
    ]
    assert refused == list(zip((1, 4), expected_reasons))
    assert all(reason.startswith(("OSError", "SyntaxError")) for reason in expected_reasons)
    workers = ManifestImages(manifest)
    good = Collate(default_preprocess(), defer_resize=False)([workers[i] for i in (0, 2, 3)])
    torch.testing.assert_close(crops, good.pixels, rtol=0, atol=0)


def test_jpeg_files_extract_when_the_caller_turns_warnings_into_errors(tiny_imagenet, tmp_path):
    """CPU, workers=0: torchvision's decoder warns that it is deprecated on every call; with
    warnings as errors (a notebook's or pytest's filter) no file may be recorded as failed, and
    the caller's filters are left as they were."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filters = list(warnings.filters)
        out = extract_features(tiny_imagenet, tmp_path / "features.h5", splits=["train"])
        assert warnings.filters == filters
    with store.open_complete(out) as file:
        assert store.read_failed(file, "train") == []
        assert store.read_split(file, "train").features.shape[0] == 12
