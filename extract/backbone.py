"""The frozen backbone: torchvision's AlexNet, its weights, and the cut at fc7.

Weights come from one of three places, named by the `--weights` argument of every command:

* ``imagenet``: torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` through torchvision's own loader,
  so a torch hub cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``) or a download
  serves it;
* ``random``: AlexNet initialised from a fixed seed, reproducible, for runs with no weights at hand;
* a path: a torchvision AlexNet ``state_dict`` file, read with ``weights_only=True``.

Each set of weights is identified by the SHA-256 of its tensors (`state_dict_sha256`), which does
not depend on how the file was written; extraction records it and `live` checks it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from extract.errors import UserError, first_line

if TYPE_CHECKING:
    from torchvision.models import AlexNet_Weights

BACKBONE = "alexnet"
FC7_NODE = "classifier.5"
FEATURE_DIM = 4096
RANDOM_SEED = 0


def imagenet_weights() -> AlexNet_Weights:
    """torchvision's ``AlexNet_Weights.IMAGENET1K_V1``: the file's address and the class names.

    torchvision is imported here, not with this module: it adds some 170 MB to a process,
    and `head` training, which reads this module's constants, never builds the network.
    """
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1


def imagenet_cache_file() -> Path:
    """Where torchvision looks for (and downloads) the pretrained weights."""
    name = imagenet_weights().url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_alexnet(weights: str) -> nn.Module:
    """Build the full 1000-way AlexNet with the named weights, in eval mode, on the CPU."""
    from torchvision.models import alexnet

    if weights == "imagenet":
        try:
            model = alexnet(weights=imagenet_weights(), progress=False)
        except (OSError, RuntimeError) as error:
            raise UserError(
                f"pretrained AlexNet weights are not in {imagenet_cache_file()} and could not be "
                f"downloaded ({type(error).__name__}); use --weights random or a weights file"
            ) from None
    elif weights == "random":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(RANDOM_SEED)
        model = alexnet(weights=None)
        torch.random.set_rng_state(generator_state)
    else:
        model = alexnet(weights=None)
        model.load_state_dict(read_state_dict(Path(weights), model.state_dict()))
    return model.eval().requires_grad_(False)


def read_state_dict(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a weights file safely and check its keys and shapes against `expected`."""
    if not path.is_file():
        raise UserError(f"{path}: weights file not found (use imagenet, random or a file path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise UserError(f"{path}: not a readable weights file ({first_line(error)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict (a dict of tensors)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path}: not a torchvision AlexNet state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, "
                f"AlexNet needs {tuple(tensor.shape)}"
            )
    return state


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of the weights themselves: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fc7_extractor(model: nn.Module) -> nn.Sequential:
    """AlexNet cut after ``classifier.5``: fc7 after its ReLU, 4096 numbers per image.

    The two dropout layers are kept and stay inactive in eval mode, so the layer indices (and
    thus the node name) are the same as in torchvision's model.
    """
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), model.classifier[:6]).eval()


def fc8_layer(model: nn.Module) -> nn.Linear:
    """The pretrained 1000-way ImageNet classifier that the new head replaces."""
    return model.classifier[6]
