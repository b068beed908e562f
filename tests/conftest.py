"""Shared test data: tiny Tiny-ImageNet-shaped datasets of real JPEG files, and offline weights.

Everything is written into pytest's temporary folders; nothing outside the repo is read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import alexnet

from extract import backbone, runner, store
from head import checkpoint

WNIDS = ("n01443537", "n01629819", "n01641577")
NAMES = ("goldfish", "European fire salamander", "bullfrog")


def pattern_image(label: int, index: int, size: int = 64) -> Image.Image:
    """A structured image whose colour and stripes depend on the class, so classes differ."""
    rng = np.random.default_rng(1000 * label + index)
    y, x = np.mgrid[0:size, 0:size]
    base = np.zeros((size, size, 3))
    base[..., label % 3] = 160 + 60 * np.sin((x + 3 * index) / (2 + label))
    base[..., (label + 1) % 3] = 80 * (y / size)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_tiny_imagenet(
    root: Path,
    train_per_class: int = 4,
    val_per_class: int = 2,
    test_images: int = 2,
    wnids=WNIDS,
    names=NAMES,
) -> Path:
    """Write a Tiny ImageNet layout with real JPEG files under `root`; returns `root`."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text(
        "".join(f"{w}\t{n}, other name\n" for w, n in zip(wnids, names))
        + "n99999999\tunused class\n"
    )
    annotations = []
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for index in range(train_per_class):
            pattern_image(label, index).save(folder / f"{wnid}_{index}.JPEG", quality=95)
        for index in range(val_per_class):
            name = f"val_{label}_{index}.JPEG"
            pattern_image(label, 100 + index).save(root / "val" / "images" / name, quality=95)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    for index in range(test_images):
        pattern_image(index % len(wnids), 200 + index).save(
            root / "test" / "images" / f"test_{index}.JPEG", quality=95
        )
    return root


@pytest.fixture
def tiny_imagenet(tmp_path: Path) -> Path:
    return write_tiny_imagenet(tmp_path / "tiny-imagenet")


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Randomly initialised AlexNet weights saved as a state_dict file (seeded, not pretrained)."""
    path = tmp_path_factory.mktemp("weights") / "alexnet_random.pth"
    torch.manual_seed(123)
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


def cache_weights(name: str, weights: Path) -> Path:
    """Link `weights` where torchvision's loader looks for `name`'s default ImageNet weights
    (under $TORCH_HOME), so ``--weights imagenet`` loads through torchvision's real loader."""
    cached = backbone.cache_file(name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.symlink_to(weights)
    return cached


@pytest.fixture
def torch_home(tmp_path: Path, weights_file: Path, monkeypatch) -> Path:
    """A TORCH_HOME whose hub cache holds AlexNet weights under torchvision's own file name, so
    that ``--weights imagenet`` loads through torchvision's real loader, offline."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    cache_weights("alexnet", weights_file)
    return home


def extract_features(data: Path, out: Path, **overrides) -> Path:
    """Run extraction in-process with test-friendly defaults; returns the feature file.

    The device is the CPU unless a test asks for another: `--device auto` would mean CUDA in
    tf32 on a machine with a GPU, and the tests comparing with a CPU fp32 reference would then
    measure tf32's error instead of ours. CUDA runs are in test_cuda.py with their tolerances.
    """
    options = runner.Options(
        data=data,
        out=out,
        workers=0,
        batch_size=8,
        progress=False,
        weights="random",
        device="cpu",
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    runner.run(options)
    return out


@pytest.fixture
def features_file(tiny_imagenet: Path, tmp_path: Path, weights_file: Path) -> Path:
    """fc7 features of `tiny_imagenet` (train, val, test) with random-init weights."""
    return extract_features(
        tiny_imagenet,
        tmp_path / "features.h5",
        splits=["train", "val", "test"],
        weights=str(weights_file),
    )


# live: a model folder, generated videos and the command run headless

REPO = Path(__file__).resolve().parents[1]


def class_mean_head(
    features: np.ndarray, labels: np.ndarray, margin: float = 3.0
) -> torch.nn.Linear:
    """A linear layer that scores each class by how close a feature vector is to that class's
    mean (relative to the mean of all), scaled so the median top-1 logit leads the runner-up by
    `margin`: probabilities far from uniform (about 0.9 against 0.03 at margin 3), so that
    top-k orders, smoothing and precision checks on them can fail. With random weights, a head
    of random rows gives about 1/3 for every class of every image, which any model passes."""
    features = torch.as_tensor(features, dtype=torch.float32)
    classes = int(labels.max()) + 1
    overall = features.mean(0)
    means = torch.stack([features[torch.as_tensor(labels == c)].mean(0) for c in range(classes)])
    weight = means - overall
    logits = (features - overall) @ weight.T
    gaps = logits.topk(2, dim=1).values
    scale = margin / (gaps[:, 0] - gaps[:, 1]).median()
    head = torch.nn.Linear(features.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(weight * scale)
        head.bias.copy_(-(weight * scale) @ overall)
    return head


def write_checkpoint(root: Path, weights_file: Path) -> Path:
    """A head checkpoint as head.train writes it, on real extracted features' provenance, with
    a class-mean head (`class_mean_head`) that separates the pattern classes of `pattern_image`
    and `video_frames`; returns the model folder (holding best.pt)."""
    data = write_tiny_imagenet(root / "data", train_per_class=2, val_per_class=0, test_images=0)
    features = extract_features(
        data, root / "features.h5", splits=["train"], weights=str(weights_file)
    )
    with store.open_complete(features) as file:
        classes = store.read_classes(file)
        provenance = store.provenance(file)
        train = store.read_split(file, "train")
    head = class_mean_head(train.features, train.labels)
    trained = checkpoint.Checkpoint(
        weight=head.weight.detach(),
        bias=head.bias.detach(),
        wnids=classes.wnids,
        class_names=dict(zip(classes.wnids, classes.names)),
        provenance=provenance,
        epoch=1,
    )
    folder = root / "model"
    folder.mkdir()
    checkpoint.save(trained, folder / checkpoint.BEST)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, weights_file: Path) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("live-model"), weights_file)


def video_frames(
    count: int, width: int = 160, height: int = 120, labels: list[int] | None = None
) -> list[np.ndarray]:
    """BGR frames with class-like colour patterns that differ from frame to frame; frame i shows
    class `labels[i]` (by default i % 3)."""
    labels = labels or [i % 3 for i in range(count)]
    return [
        cv2.cvtColor(
            np.asarray(pattern_image(labels[i], i, size=width))[:height], cv2.COLOR_RGB2BGR
        )
        for i in range(count)
    ]


def write_lossless_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """FFV1 in AVI; checks that reading it back gives exactly the frames written."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    assert all(np.array_equal(a, b) for a, b in zip(read_video(path), frames, strict=True))
    return path


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def run_live(*args: str, module: str = "live") -> subprocess.CompletedProcess:
    """`python -m live` (or `module`) as a user runs it, from the repo root, with no display."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
