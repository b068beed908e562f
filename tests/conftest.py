"""Shared test data: tiny Tiny-ImageNet-shaped datasets of real JPEG files, and offline weights.

Everything is written into pytest's temporary folders; nothing outside the repo is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import alexnet

from extract import runner
from extract.backbone import imagenet_cache_file

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


def write_tiny_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 2,
                        test_images: int = 2, wnids=WNIDS, names=NAMES) -> Path:
    """Write a Tiny ImageNet layout with real JPEG files under `root`; returns `root`."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text(
        "".join(f"{w}\t{n}, other name\n" for w, n in zip(wnids, names))
        + "n99999999\tunused class\n")
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
            root / "test" / "images" / f"test_{index}.JPEG", quality=95)
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


@pytest.fixture
def torch_home(tmp_path: Path, weights_file: Path, monkeypatch) -> Path:
    """A TORCH_HOME whose hub cache holds weights under torchvision's own file name, so that
    ``--weights imagenet`` loads through torchvision's real loader, offline."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    cached = imagenet_cache_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_file.read_bytes())
    return home


def extract_features(data: Path, out: Path, **overrides) -> Path:
    """Run extraction in-process with test-friendly defaults; returns the feature file."""
    options = runner.Options(data=data, out=out, workers=0, batch_size=8, progress=False,
                             weights="random")
    for key, value in overrides.items():
        setattr(options, key, value)
    runner.run(options)
    return out


@pytest.fixture
def features_file(tiny_imagenet: Path, tmp_path: Path, weights_file: Path) -> Path:
    """fc7 features of `tiny_imagenet` (train, val, test) with random-init weights."""
    return extract_features(tiny_imagenet, tmp_path / "features.h5",
                            splits=["train", "val", "test"], weights=str(weights_file))
