"""The one image preprocessing of the project: extraction and live inference both use it.

It is the evaluation transform of the backbone's weights, with the parameters of their own
``transforms()`` (`extract.backbone.preprocess_of`; for AlexNet: resize the shorter side to 256,
bilinear with antialiasing, center-crop 224, scale to [0, 1], normalize with ImageNet mean and
std), split in two halves so that the expensive part can run where it is cheapest:

* `decode` then `resize_crop` (`to_uint8` does both): RGB -> resize -> crop -> uint8 CHW
  tensor, per image in DataLoader workers, or batched on the GPU. Staying in uint8 keeps
  worker-to-main and host-to-GPU copies 4x smaller.
* `normalize` (per batch, on the compute device): uint8 -> float -> (x / 255 - mean) / std.

The parameters are written into every HDF5 file and checkpoint (`Preprocess.to_json`) so that a
model is always fed the way its features were made.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as TF


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Parameters of the evaluation transform. They come from the weights' own transforms
    (`extract.backbone.preprocess_of`; the default backbone's: `backbone.default_preprocess`)
    or from a file's record (`from_json`), never from defaults typed here."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    antialias: bool

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        fields = json.loads(text)
        fields["mean"] = tuple(fields["mean"])
        fields["std"] = tuple(fields["std"])
        return cls(**fields)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, ...) to 8-bit RGB.

    16-bit and 32-bit integer images are scaled down to 8 bits first: PIL's own conversion
    clips them, which turns most 16-bit photos white. Values are read on the 16-bit scale (or
    the 8-bit one when none exceeds 255); those past 65535 are white.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return image.convert("RGB")


def decode(image: Image.Image) -> torch.Tensor:
    """Any PIL image as a (3, H, W) uint8 RGB tensor at its own size."""
    return F.pil_to_tensor(to_rgb(image))


def resize_crop(pixels: torch.Tensor, params: Preprocess) -> torch.Tensor:
    """Resize the shorter side and center-crop (3, H, W) or same-size (N, 3, H, W) uint8 pixels.

    torchvision's uint8 tensor resize: on the CPU, bilinear gives exactly PIL's pixels when
    enlarging (Tiny ImageNet's 64 -> 256) and at most one level off when shrinking (fc7 within
    5e-4); bicubic (EfficientNet, Swin) at most two levels off, on a few pixels in a thousand,
    both ways (features within 1e-3, tests/test_backbones.py). On CUDA it runs batched on the
    GPU, where decoding workers would otherwise be the limit.
    """
    pixels = TF.resize(
        pixels,
        params.resize_size,
        interpolation=InterpolationMode(params.interpolation),
        antialias=params.antialias,
    )
    return TF.center_crop(pixels, [params.crop_size, params.crop_size])


def to_uint8(image: Image.Image, params: Preprocess) -> torch.Tensor:
    """RGB-convert, resize and crop one image; returns a (3, crop, crop) uint8 tensor."""
    return resize_crop(decode(image), params)


def rgb_array_to_uint8(rgb: np.ndarray, params: Preprocess) -> torch.Tensor:
    """Same as `to_uint8` for an HxWx3 uint8 RGB array (a video frame after BGR -> RGB)."""
    return resize_crop(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), params)


def normalize(
    batch: torch.Tensor, params: Preprocess, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Turn a (N, 3, H, W) uint8 batch into the normalized float batch the network expects.

    Runs on whatever device `batch` is on; the result is channels_last, which the convolutions
    of AlexNet run faster in on both CPU and GPU.
    """
    mean = torch.tensor(params.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(params.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    # Reorder while still uint8 (a quarter of the bytes), then work in place.
    images = batch.contiguous(memory_format=torch.channels_last).float()
    return images.sub_(mean).div_(std).to(dtype)
