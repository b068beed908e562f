"""Decoding image files into uint8 tensors in DataLoader workers, with failures kept, not raised.

An unreadable file (truncated, empty, not an image, too large) must not stop a long run: the
worker returns the reason instead of the pixels, and the run records it in the split's
``failed`` list.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from extract.errors import first_line
from extract.preprocess import Preprocess, decode, resize_crop


def read_pixels(path: Path) -> torch.Tensor:
    """Read one file fully as (3, H, W) uint8 RGB; raises for anything unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return decode(image)


def failure_reason(error: BaseException) -> str:
    """Why a file could not be read: the error's type and the first line of its message."""
    message = first_line(error)
    name = type(error).__name__
    return name if message == name else f"{name}: {message}"


class ManifestImages(Dataset):
    """A split's image files, as listed in its manifest, for the extraction's DataLoader.

    Items are (manifest index, uint8 pixels at their own size or None, failure reason)."""

    def __init__(self, root: Path, paths: list[str], indices: range):
        self.root = root
        self.paths = paths
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str]:
        index = self.indices[position]
        try:
            return index, read_pixels(self.root / self.paths[index]), ""
        except Exception as error:  # every decoder error is a property of the file
            return index, None, failure_reason(error)


@dataclasses.dataclass
class Batch:
    """What a worker hands over: the readable images, stacked, and the failures."""

    indices: list[int]
    pixels: torch.Tensor | None  # (N, 3, H, W) uint8
    resized: bool  # False: same-size originals, left to `resize_crop` on the device
    failed: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread, so host-to-GPU copies can overlap."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class Collate:
    """Stack a batch in the worker; resize there unless the device is to do it in one go.

    Deferring works only when every image of the batch has the same size (Tiny ImageNet's
    are all 64x64); otherwise the worker resizes them one by one.
    """

    def __init__(self, params: Preprocess, defer_resize: bool):
        self.params = params
        self.defer_resize = defer_resize

    def __call__(self, items: list[tuple[int, torch.Tensor | None, str]]) -> Batch:
        good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
        failed = [(index, reason) for index, pixels, reason in items if pixels is None]
        if not good:
            return Batch([], None, True, failed)
        images = [pixels for _, pixels in good]
        same_size = all(image.shape == images[0].shape for image in images)
        if self.defer_resize and same_size:
            return Batch([i for i, _ in good], torch.stack(images), False, failed)
        crops = torch.stack([resize_crop(image, self.params) for image in images])
        return Batch([i for i, _ in good], crops, True, failed)
