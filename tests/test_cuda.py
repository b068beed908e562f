"""Every CUDA path against its CPU reference, with the tolerance of the precision that ran.

Skipped without CUDA; run them alone with `make test-cuda` (``pytest -m cuda``).
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from conftest import (
    extract_features,
    pattern_image,
    read_video,
    run_live,
    video_frames,
    write_lossless_video,
)
from extract import store
from extract.backbone import default_preprocess
from extract.dataset import Manifest
from extract.images import Collate, ManifestImages, crops_on_device
from extract.preprocess import decode, resize_crop
from extract.sources import folder_files
from head import features
from head.graphs import REPLAYED
from head.training import Settings, train
from live import model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Per-row relative error of fc7 against CPU fp32 features of the same images. Each is below
# the distance between two images of one class (0.046 for the closest pair of the tiny
# dataset's random-weight features), which the bf16 test asserts.
TOLERANCES = {"fp32": 2e-3, "tf32": 1e-2, "fp16": 1e-2, "bf16": 1.5e-2}


def relative_row_errors(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ours - reference, axis=1) / np.linalg.norm(reference, axis=1)


def max_relative_row_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(relative_row_errors(ours, reference).max())


def closest_same_class_distance(features: np.ndarray, labels: np.ndarray) -> float:
    """The smallest relative distance between two rows of one class (a NumPy brute force)."""
    return min(
        float(np.linalg.norm(features[i] - features[j]) / np.linalg.norm(features[j]))
        for i in range(len(features))
        for j in range(len(features))
        if i != j and labels[i] == labels[j]
    )


def cpu_fp32_features(data, out, weights_file, **overrides) -> dict[str, np.ndarray]:
    path = extract_features(
        data, out, weights=str(weights_file), store_dtype="float32", precision="fp32", **overrides
    )
    with h5py.File(path) as file:
        return {split: file[f"{split}/features"][()] for split in ("train", "val")}


def cpu_labels(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as file:
        return {split: file[f"{split}/labels"][()] for split in ("train", "val")}


@pytest.mark.parametrize("precision", ["auto", "fp32", "tf32", "fp16", "bf16"])
def test_extract_on_cuda_per_precision_matches_cpu_fp32(
    tiny_imagenet, tmp_path, weights_file, precision
):
    expected = cpu_fp32_features(tiny_imagenet, tmp_path / "cpu.h5", weights_file)
    out = extract_features(
        tiny_imagenet,
        tmp_path / "cuda.h5",
        device="cuda",
        weights=str(weights_file),
        store_dtype="float32",
        precision=precision,
    )
    ran = "tf32" if precision == "auto" else precision
    labels = cpu_labels(tmp_path / "cpu.h5")
    with h5py.File(out) as file:
        assert file.attrs["precision"] == ran
        for split in ("train", "val"):
            got = file[f"{split}/features"][()]
            tolerance = TOLERANCES[ran]
            assert max_relative_row_error(got, expected[split]) <= tolerance
            # Negative controls: the tolerance would notice each row moved by one, and is
            # tighter than the closest two images of one class.
            shifted = relative_row_errors(got[1:], expected[split][:-1])
            assert shifted.min() > tolerance
            assert closest_same_class_distance(expected[split], labels[split]) > tolerance


def test_extract_leaves_the_tf32_settings_as_it_found_them(tiny_imagenet, tmp_path, weights_file):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    extract_features(
        tiny_imagenet, tmp_path / "f.h5", device="cuda", weights=str(weights_file), splits=["val"]
    )
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_resize_on_the_device_equals_resizing_each_image_on_the_cpu():
    items = [(i, decode(pattern_image(i % 3, i)), "") for i in range(6)]
    deferred = Collate(default_preprocess(), defer_resize=True)(items)
    eager = Collate(default_preprocess(), defer_resize=False)(items)
    on_device = resize_crop(deferred.pixels.cuda(), default_preprocess()).cpu()
    difference = (on_device.int() - eager.pixels.int()).abs()
    assert difference.max() <= 1  # float interpolation rounded vs the CPU's uint8 kernel
    assert difference.float().mean() < 0.5


def test_photos_of_mixed_sizes_resized_on_the_device_match_cpu_fp32(tmp_path, weights_file):
    root = tmp_path / "photos"
    for label, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for index, size in enumerate(((400, 300), (300, 400), (500, 333))):
            pattern_image(label, index, size=500).resize(size).save(root / name / f"{index}.jpg")
    expected = extract_features(
        root, tmp_path / "cpu.h5", weights=str(weights_file), store_dtype="float32"
    )
    got = extract_features(
        root,
        tmp_path / "cuda.h5",
        device="cuda",
        precision="fp32",
        weights=str(weights_file),
        store_dtype="float32",
    )
    with h5py.File(expected) as cpu, h5py.File(got) as cuda:
        error = max_relative_row_error(cuda["train/features"][()], cpu["train/features"][()])
    assert error <= TOLERANCES["fp32"]


def test_device_decoding_reads_every_file_and_stays_within_tolerance(
    tiny_imagenet, tmp_path, weights_file
):
    folder = tiny_imagenet / "train/n01443537/images"
    pattern_image(0, 7).convert("L").save(folder / "gray.JPEG")
    pattern_image(0, 8).convert("CMYK").save(folder / "cmyk.JPEG")  # PIL, in the worker
    pattern_image(0, 9).save(folder / "png.JPEG", format="PNG")
    pattern_image(1, 3, size=300).resize((400, 300)).save(folder / "photo.JPEG")
    (folder / "empty.JPEG").write_bytes(b"")
    whole = (folder / "n01443537_0.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])  # refused by nvJPEG too
    expected = cpu_fp32_features(tiny_imagenet, tmp_path / "cpu.h5", weights_file)
    out = extract_features(
        tiny_imagenet,
        tmp_path / "device.h5",
        device="cuda",
        decode="device",
        weights=str(weights_file),
        store_dtype="float32",
        precision="fp32",
    )
    with store.open_complete(out) as file, h5py.File(tmp_path / "cpu.h5") as cpu:
        assert store.read_failed(file, "train") == store.read_failed(cpu, "train")
        assert len(store.read_failed(file, "train")) == 2
        got = store.read_split(file, "train").features
    # nvJPEG's inverse DCT and upsampling differ from libjpeg's by a level here and there.
    assert max_relative_row_error(got, expected["train"]) <= 1e-2


def test_device_decoded_pixels_are_close_to_the_workers_pixels(tmp_path):
    paths = []
    for index in range(4):
        path = tmp_path / f"{index}.jpg"
        pattern_image(index % 3, index, size=200).resize((200 + 40 * index, 150)).save(path)
        paths.append(path.name)
    manifest = Manifest("train", paths, [0] * 4, reader=folder_files(tmp_path, paths))
    files = ManifestImages(manifest, decode="device")
    batch = Collate(default_preprocess(), defer_resize=True, decode="device")(
        [files[i] for i in range(4)]
    )
    on_device, refused = crops_on_device(
        batch.unstacked, default_preprocess(), torch.device("cuda")
    )
    on_device = on_device.cpu()
    assert refused == []
    workers = Collate(default_preprocess(), defer_resize=False)(
        [ManifestImages(manifest)[i] for i in range(4)]
    )
    difference = (on_device.int() - workers.pixels.int()).abs().float()
    assert on_device.shape == (4, 3, 224, 224)
    # nvJPEG upsamples chroma its own way: a few levels at colour edges, smoothed by the resize.
    assert difference.mean() < 2.0 and difference.max() <= 40


@pytest.fixture
def cached(tiny_imagenet, tmp_path, weights_file):
    return extract_features(
        tiny_imagenet, tmp_path / "f.h5", weights=str(weights_file), flip=True, splits=["train"]
    )


def train_on(cached, save, device: str, stream: bool | None = None, **settings):
    data = features.load(
        cached, flip=True, device=torch.device(device), report=lambda line: None, stream=stream
    )
    options = Settings(progress=False, flip=True, **{"batch_size": 5, **settings})
    return train(data, save, options, torch.device(device), report=lambda line: None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_head_on_cuda_follows_the_cpu_and_resumes_exactly(cached, tmp_path, precision):
    common = {"precision": precision, "weight_decay": 0.01, "standardize": True}
    cpu = train_on(cached, tmp_path / "cpu", "cpu", epochs=6, **common)
    straight = train_on(cached, tmp_path / "straight", "cuda", epochs=6, **common)
    train_on(cached, tmp_path / "split", "cuda", epochs=3, **common)
    resumed = train_on(cached, tmp_path / "split", "cuda", epochs=6, resume=True, **common)
    for name in ("weight", "bias"):
        torch.testing.assert_close(resumed.layer[name], straight.layer[name], rtol=0, atol=1e-6)
        tolerance = 1e-3 if precision == "fp32" else 2e-2
        torch.testing.assert_close(straight.layer[name], cpu.layer[name], rtol=0, atol=tolerance)
    rel = 1e-3 if precision == "fp32" else 2e-2  # bf16 products round differently per device
    assert straight.history["train_loss"] == pytest.approx(cpu.history["train_loss"], rel=rel)


@pytest.mark.parametrize("batch_size", [4, 5])  # 12 rows: full batches only, and a short one
def test_graphed_epochs_equal_eager_epochs(cached, tmp_path, batch_size):
    results, replays = {}, {}
    for graphs in (True, False):
        before = REPLAYED.replays
        results[graphs] = train_on(
            cached,
            tmp_path / f"graphs-{graphs}",
            "cuda",
            epochs=4,
            batch_size=batch_size,
            cuda_graphs=graphs,
            standardize=True,
        )
        replays[graphs] = REPLAYED.replays - before
    # The graphed run replayed its graph at least once per epoch; the eager run never did.
    assert replays[True] >= 4 and replays[False] == 0
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            results[True].layer[name], results[False].layer[name], rtol=0, atol=1e-6
        )
    assert results[True].history["train_loss"] == pytest.approx(
        results[False].history["train_loss"], abs=1e-6
    )
    assert results[True].history["train_top1"] == results[False].history["train_top1"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_training_on_cuda_follows_the_streamed_cpu_run(cached, tmp_path, precision):
    """Streamed from the file in blocks, on CUDA and on the CPU: the same draws, the same layer
    within the device's rounding (fp32 1e-3, bf16 2e-2), and no CUDA graph."""
    common = {"precision": precision, "epochs": 3}  # raw features: weights near 1e-2
    before = REPLAYED.replays
    cuda = train_on(cached, tmp_path / "cuda", "cuda", stream=True, **common)
    assert REPLAYED.replays == before, "a streamed epoch runs eagerly"
    cpu = train_on(cached, tmp_path / "cpu", "cpu", stream=True, **common)
    tolerance = 1e-3 if precision == "fp32" else 2e-2
    for name in ("weight", "bias"):
        torch.testing.assert_close(cuda.layer[name], cpu.layer[name], rtol=0, atol=tolerance)
    assert cuda.history["train_loss"] == pytest.approx(cpu.history["train_loss"], rel=tolerance)
    # Negative control: another seed's run (its own init and draws) is told apart (0.033 on a
    # CPU, against the tolerance's 2e-2 at most).
    other = train_on(cached, tmp_path / "other", "cpu", stream=True, **{**common, "seed": 1})
    assert (other.layer["weight"] - cpu.layer["weight"]).abs().max() > tolerance


def test_live_on_cuda_gives_the_cpu_probabilities(model_dir):
    """CUDA fp32 within 1e-3 and bf16 within 5e-3 of the CPU's fp32 probabilities, per class."""
    cpu = model.from_checkpoint(model_dir, device="cpu")
    resized = dataclasses.replace(cpu.params, resize_size=cpu.params.crop_size)
    for precision, tolerance in (("fp32", 1e-3), ("bf16", 5e-3)):
        cuda = model.from_checkpoint(model_dir, device="cuda", precision=precision)
        for frame in video_frames(3):
            pixels = model.frame_pixels(frame, cpu.params)
            expected = cpu.probabilities(pixels)
            np.testing.assert_allclose(cuda.probabilities(pixels), expected, rtol=0, atol=tolerance)
            # Negative control: the frame resized to 224 before the crop (not 256) is told apart.
            other = cpu.probabilities(model.frame_pixels(frame, resized))
            assert np.abs(other - expected).max() > tolerance


def test_live_cli_on_cuda_writes_one_annotated_frame_per_classified_frame(tmp_path, model_dir):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(12))
    result = run_live(
        "--model",
        str(model_dir),
        "--source",
        str(video),
        "--device",
        "cuda",
        "--output",
        str(tmp_path / "out.mp4"),
        "--log",
        str(tmp_path / "log.jsonl"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("12 frames, 0 dropped")
    assert len(read_video(tmp_path / "out.mp4")) == 12
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 12
