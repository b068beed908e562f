"""The stitched classifier: `extract`'s backbone up to its feature node and `head`'s trained layer,
one module.

The backbone is rebuilt from the provenance the checkpoint carries (architecture, node, weights,
their SHA-256, the preprocessing parameters), so a frame is fed to the network exactly as the
training images were.
Weights whose digest differs from the recorded one are refused: the head would be reading
features it never saw.

A video frame is BGR (OpenCV's order); `frame_pixels` converts it to RGB explicitly and then hands
it to `extract.preprocess`, the one preprocessing of the project.

The checkpoint is read by `head.checkpoint.load`, with ``weights_only=True``; it checks everything
in it that says how to rebuild the model (the feature provenance, the preprocessing JSON, the
class names) for type and parses it as JSON, never evaluates it, and refuses anything else.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from extract import backbone
from extract.device import resolve_device
from extract.errors import UserError
from extract.precisions import DTYPES, LIVE_CHOICES, checked
from extract.preprocess import Preprocess, normalize, rgb_array_to_uint8
from head import checkpoint
from head.model import head_from_layer, imagenet_wnids

WARM_UP_RUNS = 2


class Stitched(nn.Module):
    """Normalized (N, 3, H, W) images in, class logits out: the backbone cut at its feature
    node, then the head."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclasses.dataclass
class Classifier:
    """The network with everything needed to feed it and to name its outputs."""

    network: Stitched
    params: Preprocess
    wnids: list[str]
    names: list[str]
    device: torch.device
    weights_sha256: str
    dtype: torch.dtype = torch.float32
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # as a checkpoint's

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Class probabilities (C,) for one (3, crop, crop) uint8 image from `frame_pixels`."""
        return self.batch_probabilities(pixels.unsqueeze(0))[0]

    def batch_probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, C) for (N, 3, crop, crop) uint8 images."""
        with torch.inference_mode():
            images = normalize(pixels.to(self.device), self.params, self.dtype)
            logits = self.network(images)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def batch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's features (N, D), float32 on the CPU, of (N, 3, crop, crop) uint8 images:
        what the head reads, and what teaching a class keeps."""
        with torch.inference_mode():
            images = normalize(pixels.to(self.device), self.params, self.dtype)
            return self.network.features(images).float().cpu()

    def replace_head(self, head: nn.Linear, wnids: list[str], names: list[str]) -> None:
        """Classify with `head` (float32, any device) and these classes from the next batch on."""
        self.network.head = head.eval().requires_grad_(False).to(self.device, dtype=self.dtype)
        self.wnids, self.names = list(wnids), list(names)

    def warm_up(self) -> None:
        """Run the network before the first frame, so that frame's latency is not the slowest."""
        blank = torch.zeros(3, self.params.crop_size, self.params.crop_size, dtype=torch.uint8)
        for _ in range(WARM_UP_RUNS):
            self.probabilities(blank)


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A linear layer holding `weight` (C, D) and `bias` (C,); C may be 0, before any class is
    taught (torch warns that initialising such a layer does nothing: it is not initialised)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0])
    layer.load_state_dict({"weight": weight, "bias": bias})
    return layer


def frame_pixels(bgr: np.ndarray, params: Preprocess) -> torch.Tensor:
    """A BGR video frame -> RGB -> `extract`'s resize and crop: a (3, crop, crop) uint8 tensor."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb_array_to_uint8(rgb, params)


def prepare(
    network: Stitched, device: torch.device, dtype: torch.dtype = torch.float32
) -> Stitched:
    """Eval mode, no gradients, on the device, in the channels_last layout `normalize` produces,
    in the compute dtype (bf16 roughly halves a CPU's time per frame where it has bf16 units)."""
    return (
        network.eval()
        .requires_grad_(False)
        .to(device, dtype=dtype, memory_format=torch.channels_last)
    )


def default_threads() -> int:
    """Intra-op threads for the network on the CPU: every core. On a quiet 2-core CPU two
    threads gave 42 FPS against 33 with one (benchmarks/RESULTS.md); on a machine busy with
    other work, fewer threads than cores avoids waiting on a descheduled one (`--threads`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def from_checkpoint(
    model: Path, weights: str | None = None, device: str = "cpu", precision: str = "fp32"
) -> Classifier:
    """Rebuild backbone and head from a checkpoint (a file, or a folder holding best.pt)."""
    return from_state(checkpoint.load(model), model, weights, device, precision)


def from_state(
    state: checkpoint.Checkpoint,
    model: Path,
    weights: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> Classifier:
    """`from_checkpoint` on a checkpoint already loaded from `model`."""
    dtype = DTYPES[checked(precision, LIVE_CHOICES)]
    features, params = state.provenance, checkpoint.preprocess_of(state, str(model))
    if features["backbone"] not in backbone.architectures():
        raise UserError(
            f"{model}: trained on features of {features['backbone']}, which is not a "
            f"torchvision network here"
        )
    frozen = backbone.build(features["backbone"], weights or features["weights"], features["node"])
    if frozen.weights_sha256 != features["weights_sha256"]:
        raise UserError(
            f"--weights {weights or features['weights']}: sha256 {frozen.weights_sha256[:12]}... "
            f"differs from {features['weights_sha256'][:12]}... of the weights the head was "
            f"trained on (extracted with --weights {features['weights']})"
        )
    head = head_from_layer(state.weight, state.bias, str(model), frozen.feature_dim)
    resolved = resolve_device(device)
    return Classifier(
        network=prepare(Stitched(frozen.extractor, head), resolved, dtype),
        params=params,
        wnids=state.wnids,
        names=state.names,
        device=resolved,
        weights_sha256=frozen.weights_sha256,
        dtype=dtype,
        provenance=dict(features),
    )


def untrained(
    architecture: str = backbone.DEFAULT_BACKBONE,
    weights: str = backbone.IMAGENET,
    device: str = "cpu",
    precision: str = "fp32",
) -> Classifier:
    """The backbone with a head of no classes yet, for teaching classes from scratch."""
    dtype = DTYPES[checked(precision, LIVE_CHOICES)]
    frozen = backbone.build(architecture, weights)
    resolved = resolve_device(device)
    return Classifier(
        network=prepare(
            Stitched(
                frozen.extractor,
                linear(torch.zeros(0, frozen.feature_dim), torch.zeros(0)),
            ),
            resolved,
            dtype,
        ),
        params=frozen.preprocess,
        wnids=[],
        names=[],
        device=resolved,
        weights_sha256=frozen.weights_sha256,
        dtype=dtype,
        provenance=frozen.provenance(),
    )


def imagenet(
    weights: str = backbone.IMAGENET,
    device: str = "cpu",
    precision: str = "fp32",
    architecture: str = backbone.DEFAULT_BACKBONE,
) -> Classifier:
    """The pretrained network's own 1000-way ImageNet classifier (AlexNet's fc8), to check the
    camera and the preprocessing before any training."""
    dtype = DTYPES[checked(precision, LIVE_CHOICES)]
    frozen = backbone.build(architecture, weights)
    categories = backbone.categories(architecture, weights)
    if categories is None:
        raise UserError(f"--weights {weights}: {architecture} has no named ImageNet classes")
    resolved = resolve_device(device)
    return Classifier(
        network=prepare(
            Stitched(frozen.extractor, backbone.imagenet_classifier(frozen.network)),
            resolved,
            dtype,
        ),
        params=frozen.preprocess,
        wnids=imagenet_wnids(),
        names=categories,
        device=resolved,
        weights_sha256=frozen.weights_sha256,
        dtype=dtype,
        provenance=frozen.provenance(),
    )
