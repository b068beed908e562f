"""Decoding image files into uint8 tensors in DataLoader workers, with failures kept, not raised.

An unreadable file (truncated, empty, not an image, too large) must not stop a long run: the
worker returns the reason instead of the pixels, and the run records it in the split's
``failed`` list.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from extract.preprocess import Preprocess, to_uint8


def decode(path: Path, params: Preprocess) -> torch.Tensor:
    """Read one file fully and preprocess it; raises for anything unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return to_uint8(image, params)


def failure_reason(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:300] if message else type(error).__name__


class ImageFiles(Dataset):
    """Items are (manifest index, uint8 tensor or None, failure reason or '')."""

    def __init__(self, root: Path, paths: list[str], indices: range, params: Preprocess):
        self.root = root
        self.paths = paths
        self.indices = indices
        self.params = params

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str]:
        index = self.indices[position]
        try:
            return index, decode(self.root / self.paths[index], self.params), ""
        except Exception as error:  # every decoder error is a property of the file
            return index, None, failure_reason(error)


def collate(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images; returns (their indices, batch, [(index, reason)] of the rest)."""
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, reason) for index, pixels, reason in items if pixels is None]
    batch = torch.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], batch, failed
