"""Decoding images into uint8 tensors in DataLoader workers, with failures kept, not raised.

The bytes come from the split's source (`extract.sources`: files, tar shards, Parquet rows).
An unreadable image (truncated, empty, not an image, too large) must not stop a long run: the
worker returns the reason instead of the pixels, and the run records it in the split's
``failed`` list.

Baseline JPEG and progressive JPEG files with one or three 8-bit components are decoded by
torchvision's `decode_jpeg` (libjpeg-turbo, twice PIL's rate on 64x64 files, the same pixels as
PIL's decoder followed by `extract.preprocess.to_rgb`); every other file, and any JPEG file
`decode_jpeg` refuses, goes through PIL, whose error is then the reason recorded. With
``decode="device"`` the workers only read those JPEG files and the GPU decodes whole batches.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from extract.dataset import Manifest
from extract.errors import first_line
from extract.preprocess import Preprocess, decode, resize_crop

DECODERS = ("workers", "device")
# Start-of-frame markers that carry the image size; 0xC4, 0xC8 and 0xCC share the range.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
BARE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}
# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call; the
# decoder is still libjpeg-turbo, held to PIL's pixels by tests/test_host_path.py.
DECODER_DEPRECATION = "The image decoding and encoding capabilities"


def jpeg_to_rgb(
    encoded: torch.Tensor | list[torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's `decode_jpeg` to RGB, its deprecation warning silenced here and only here:
    a filter set once at import would leave the caller's own filters changed, and a caller who
    turns warnings into errors would see every JPEG file recorded as failed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", DECODER_DEPRECATION, DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def read_pixels_with_pil(path: str | Path | io.BytesIO, name: str = "") -> torch.Tensor:
    """Read one file fully with PIL as (3, H, W) uint8 RGB; raises for anything unreadable.

    `name`: what to call bytes in memory when PIL cannot identify them, instead of the
    object's address, so the reason recorded is the same in every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            if not name:
                raise
            raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
        with image:
            image.load()
            return decode(image)


def read_bytes(path: str | Path) -> bytearray:
    """The whole file, in writable memory (as `torch.frombuffer` wants it)."""
    with open(path, "rb") as stream:
        return bytearray(stream.read())


def as_tensor(data: bytearray) -> torch.Tensor:
    """The bytes as a 1-D uint8 tensor sharing their memory."""
    return torch.frombuffer(data, dtype=torch.uint8)


def decodes_like_pil(header: bytes | bytearray) -> bool:
    """Whether `decode_jpeg` gives PIL's pixels for these bytes: a JPEG of one (grayscale) or
    three (YCbCr or RGB) 8-bit components, no larger than PIL's decompression-bomb limit.

    CMYK and 12-bit files go to PIL, as does anything whose header does not parse: PIL then
    reads it, or names what is wrong with it.
    """
    if header[:3] != b"\xff\xd8\xff":
        return False
    position = 2
    while position + 4 <= len(header):
        if header[position] != 0xFF:
            return False
        marker = header[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in BARE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(header[position + 2 : position + 4], "big")
        if marker in SOF_MARKERS:
            frame = header[position + 4 : position + 10]
            if len(frame) < 6:
                return False
            bits, height, width = frame[0], frame[1] << 8 | frame[2], frame[3] << 8 | frame[4]
            components = frame[5]
            limit = Image.MAX_IMAGE_PIXELS
            return (
                bits == 8
                and components in (1, 3)
                and height > 0
                and width > 0
                and (limit is None or height * width <= limit)
            )
        if marker == 0xDA or length < 2:  # scan data before any frame header: not ours
            return False
        position += 2 + length
    return False


def read_pixels(path: str | Path) -> torch.Tensor:
    """Read one file fully as (3, H, W) uint8 RGB; raises for anything unreadable."""
    return pixels_of(read_bytes(path), os.fspath(path))


def pixels_of(data: bytearray, name: str) -> torch.Tensor:
    """An encoded image as (3, H, W) uint8 RGB; raises for anything unreadable. `name` (a file
    path or a source id) stands for the bytes in PIL's message when it cannot identify them."""
    if decodes_like_pil(data):
        try:
            return jpeg_to_rgb(as_tensor(data))
        except RuntimeError:  # libjpeg refused it: PIL says why, or reads what it can
            pass
    return read_pixels_with_pil(io.BytesIO(data), name)


def for_device(data: bytearray, name: str) -> torch.Tensor:
    """The bytes of a JPEG the GPU can decode (1-D), else the pixels (3, H, W) from PIL."""
    return (
        as_tensor(data) if decodes_like_pil(data) else read_pixels_with_pil(io.BytesIO(data), name)
    )


def failure_reason(error: BaseException) -> str:
    """Why a file could not be read: the error's type and the first line of its message."""
    message = first_line(error)
    name = type(error).__name__
    return name if message == name else f"{name}: {message}"


class ManifestImages(Dataset):
    """A split's images, as listed in its manifest, for the extraction's DataLoader.

    Items are (manifest index, uint8 pixels at their own size or None, failure reason). A batch
    is fetched whole (`__getitems__`): its rows are consecutive samples of one shard or row
    group, which the manifest's reader reads in one pass, front to back. Rows the manifest
    already knows to fail (no image, a label that is not a class) are not read.

    With ``decode="device"``, JPEG files come as their bytes (1-D) for `crops_on_device`.
    """

    def __init__(self, manifest: Manifest, decode: str = "workers"):
        self.manifest = manifest
        self.decode = for_device if decode == "device" else pixels_of

    def __len__(self) -> int:
        return len(self.manifest.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[tuple[int, torch.Tensor | None, str]]:
        """The manifest's rows `rows` (a batch of `Manifest.batches`)."""
        manifest = self.manifest
        wanted = [row for row in rows if row not in manifest.failures]
        read = dict(
            zip(wanted, manifest.reader.read([manifest.reader_offset + row for row in wanted]))
        )
        items = []
        for row in rows:
            if row in manifest.failures:
                items.append((row, None, manifest.failures[row]))
                continue
            name, data = read[row]
            try:
                if isinstance(data, BaseException):
                    raise data
                items.append((row, self.decode(data, name), ""))
            except Exception as error:  # every reader and decoder error is the sample's own
                items.append((row, None, failure_reason(error)))
        return items


@dataclasses.dataclass
class Batch:
    """What a worker hands over: the readable images, stacked, and the failures."""

    indices: list[int]
    pixels: torch.Tensor | None  # (N, 3, H, W) uint8
    resized: bool  # False: same-size originals, left to `resize_crop` on the device
    failed: list[tuple[int, str]]
    # Instead of `pixels`, one tensor per index for `crops_on_device`: JPEG bytes (1-D, with
    # decode="device") or uint8 pixels at their own size (3-D: a batch of mixed sizes)
    unstacked: list[torch.Tensor] | None = None

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread, so host-to-GPU copies can overlap."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        if self.unstacked is not None:
            self.unstacked = [tensor.pin_memory() for tensor in self.unstacked]
        return self


class Collate:
    """Stack a batch in the worker; resize there unless the device is to do it.

    With `defer_resize` (CUDA), images of one size (Tiny ImageNet's are all 64x64) are stacked
    for one batched resize on the device, and a batch of mixed sizes (photos) is handed over
    image by image for `crops_on_device`: resizing a 500x375 photo took a worker 6 ms, three
    times its decoding. Without it (the CPU), the worker resizes each image. Files left for the
    device to decode are handed over as they are.
    """

    def __init__(self, params: Preprocess, defer_resize: bool, decode: str = "workers"):
        self.params = params
        self.defer_resize = defer_resize
        self.decode = decode

    def __call__(self, items: list[tuple[int, torch.Tensor | None, str]]) -> Batch:
        indices = [index for index, pixels, _ in items if pixels is not None]
        images = [pixels for _, pixels, _ in items if pixels is not None]
        failed = [(index, reason) for index, pixels, reason in items if pixels is None]
        if not images:
            return Batch([], None, True, failed)
        if self.decode == "device":
            return Batch(indices, None, False, failed, unstacked=images)
        if self.defer_resize:
            first = images[0].shape
            if all(image.shape == first for image in images):
                return Batch(indices, torch.stack(images), False, failed)
            return Batch(indices, None, False, failed, unstacked=images)
        crops = torch.stack([resize_crop(image, self.params) for image in images])
        return Batch(indices, crops, True, failed)


def crops_on_device(
    unstacked: list[torch.Tensor], params: Preprocess, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """JPEG bytes decoded by the GPU in one batched call, pixels copied over; then each group
    of same-sized images resized and cropped together.

    Returns the (N, 3, crop, crop) uint8 crops of the images that could be read, in order, and
    (position, reason) for those that could not: a file the GPU's decoder refuses is decoded
    by PIL instead, and a file PIL cannot read either is a failure with PIL's reason, as when
    the workers decode.
    """
    images: list[torch.Tensor | None] = [None] * len(unstacked)
    failed: list[tuple[int, str]] = []
    encoded = [position for position, data in enumerate(unstacked) if data.dim() == 1]
    if encoded:
        for position, pixels in zip(encoded, decode_on(device, [unstacked[p] for p in encoded])):
            images[position] = pixels
    for position, data in enumerate(unstacked):
        if data.dim() == 3:
            images[position] = data.to(device, non_blocking=True)
        elif images[position] is None:  # refused by the GPU's decoder
            try:
                pixels = read_pixels_with_pil(io.BytesIO(data.numpy().tobytes()))
                images[position] = pixels.to(device)
            except Exception as error:  # a property of the file, as in the workers
                failed.append((position, failure_reason(error)))
    kept = [position for position, pixels in enumerate(images) if pixels is not None]
    crops = torch.empty(
        (len(kept), 3, params.crop_size, params.crop_size), dtype=torch.uint8, device=device
    )
    by_size: dict[tuple[int, ...], list[int]] = {}
    for row, position in enumerate(kept):
        by_size.setdefault(tuple(images[position].shape), []).append(row)
    for rows in by_size.values():
        crops[rows] = resize_crop(torch.stack([images[kept[row]] for row in rows]), params)
    return crops, failed


def decode_on(device: torch.device, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """`decode_jpeg` of a batch on the device; one file it refuses fails the batched call, so
    then each file is tried alone, and those refused are None."""
    try:
        return jpeg_to_rgb(encoded, device)
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                decoded.append(jpeg_to_rgb(data, device))
            except RuntimeError:
                decoded.append(None)
        return decoded
