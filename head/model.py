"""The head: one linear layer from fc7 (4096) to the dataset's classes, replacing AlexNet's fc8."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from extract.backbone import FEATURE_DIM, fc8_layer, load_alexnet, state_dict_sha256
from extract.errors import UserError

IMAGENET_WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")


def new_head(num_classes: int) -> nn.Linear:
    return nn.Linear(FEATURE_DIM, num_classes)


def head_from_state(state_dict: dict[str, torch.Tensor], origin: str = "checkpoint") -> nn.Linear:
    """Rebuild the head from a checkpoint's ``state_dict`` (exactly ``weight`` and ``bias``)."""
    if set(state_dict) != {"weight", "bias"}:
        raise UserError(f"{origin}: state_dict must hold exactly 'weight' and 'bias'")
    weight, bias = state_dict["weight"], state_dict["bias"]
    if weight.ndim != 2 or weight.shape[1] != FEATURE_DIM or bias.shape != weight.shape[:1]:
        raise UserError(
            f"{origin}: head weight {tuple(weight.shape)} / bias "
            f"{tuple(bias.shape)} do not fit a 4096 -> C linear layer"
        )
    head = new_head(weight.shape[0])
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


def initial_head(num_classes: int, seed: int) -> nn.Linear:
    """A new head initialised from `seed`, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_head(num_classes)


def imagenet_wnids() -> list[str]:
    """The ImageNet-1k wnids in class-index order (index i is output i of AlexNet's fc8)."""
    return IMAGENET_WNIDS_FILE.read_text().split()


def fc8_head(fc8: nn.Linear, wnids: list[str]) -> nn.Linear:
    """A head made of the rows of ImageNet's fc8 that belong to `wnids`, in their order."""
    index = {wnid: position for position, wnid in enumerate(imagenet_wnids())}
    unknown = [wnid for wnid in wnids if wnid not in index]
    if unknown:
        raise UserError(
            f"--init fc8: {len(unknown)} of the dataset's classes are not "
            f"ImageNet-1k classes (first: {unknown[0]!r}); use --init random"
        )
    rows = torch.tensor([index[wnid] for wnid in wnids])
    head = new_head(len(wnids))
    with torch.no_grad():
        head.weight.copy_(fc8.weight[rows])
        head.bias.copy_(fc8.bias[rows])
    return head


def pretrained_fc8_head(provenance: dict[str, str], wnids: list[str], origin: str) -> nn.Linear:
    """fc8 rows of the very backbone the features came from; refused for other weights."""
    if provenance.get("weights") != "imagenet":
        raise UserError(
            f"{origin}: --init fc8 needs features from pretrained ImageNet weights, "
            f"these were extracted with --weights {provenance.get('weights')}"
        )
    model = load_alexnet("imagenet")
    if state_dict_sha256(model) != provenance.get("weights_sha256"):
        raise UserError(
            f"{origin}: the ImageNet weights found here are not the ones the features "
            f"were extracted with (weights_sha256 differs)"
        )
    return fc8_head(fc8_layer(model), wnids)


def fold_standardization(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The layer on raw features equal to (`weight`, `bias`) applied to (x - mean) / std."""
    folded = weight / std
    return {"weight": folded, "bias": bias - folded @ mean}


def unfold_standardization(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The inverse of `fold_standardization`: a raw-feature layer as a standardised one."""
    return {"weight": weight * std, "bias": bias + weight @ mean}
