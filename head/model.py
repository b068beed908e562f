"""The head: one linear layer from the backbone's features (D of them) to the dataset's classes,
replacing the backbone's own ImageNet classifier (AlexNet's fc8)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from extract import backbone
from extract.errors import UserError

IMAGENET_WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")


def new_head(feature_dim: int, num_classes: int) -> nn.Linear:
    return nn.Linear(feature_dim, num_classes)


def head_from_layer(
    weight: torch.Tensor, bias: torch.Tensor, origin: str, feature_dim: int | None = None
) -> nn.Linear:
    """The head as a module, from a checkpoint's layer (its shapes checked by
    `head.checkpoint.load`); with `feature_dim`, refuse a layer that does not take that many
    features."""
    if feature_dim is not None and weight.shape[1] != feature_dim:
        raise UserError(
            f"{origin}: the head takes {weight.shape[1]} features, the backbone gives {feature_dim}"
        )
    head = new_head(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


def initial_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """A new head initialised from `seed`, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_head(feature_dim, num_classes)


def imagenet_wnids() -> list[str]:
    """The ImageNet-1k wnids in torchvision's class-index order (index i is output i of every
    torchvision ImageNet-1k classifier)."""
    return IMAGENET_WNIDS_FILE.read_text().split()


def classifier_head(classifier: nn.Linear, wnids: list[str], init: str = "classifier") -> nn.Linear:
    """A head made of the rows of an ImageNet classifier that belong to `wnids`, in their order."""
    index = {wnid: position for position, wnid in enumerate(imagenet_wnids())}
    unknown = [wnid for wnid in wnids if wnid not in index]
    if unknown:
        raise UserError(
            f"--init {init}: {len(unknown)} of the dataset's classes are not "
            f"ImageNet-1k classes (first: {unknown[0]!r}); use --init random"
        )
    rows = torch.tensor([index[wnid] for wnid in wnids])
    head = new_head(classifier.in_features, len(wnids))
    with torch.no_grad():
        head.weight.copy_(classifier.weight[rows])
        head.bias.copy_(classifier.bias[rows])
    return head


def pretrained_classifier_head(
    provenance: dict[str, str], wnids: list[str], origin: str, init: str = "classifier"
) -> nn.Linear:
    """The ImageNet classifier rows of the very backbone the features came from: refused for
    weights that are not torchvision's ImageNet-1k ones, and for a node other than the
    classifier's input."""
    name, weights, node = provenance["backbone"], provenance["weights"], provenance["node"]
    if init == "fc8" and name != "alexnet":
        raise UserError(f"--init fc8 is AlexNet's name; for {name} use --init classifier")
    if not backbone.is_torchvision_weights(name, weights):
        raise UserError(
            f"{origin}: --init {init} needs features from pretrained ImageNet weights, "
            f"these were extracted with --weights {weights}"
        )
    if len(backbone.categories(name, weights) or []) != len(imagenet_wnids()):
        raise UserError(f"{origin}: the {name} weights {weights} have no ImageNet-1k classifier")
    network = backbone.load_network(name, weights)
    if backbone.state_dict_sha256(network) != provenance["weights_sha256"]:
        raise UserError(
            f"{origin}: the ImageNet weights found here are not the ones the features "
            f"were extracted with (weights_sha256 differs)"
        )
    expected = backbone.default_node(network, name)
    if node != expected:
        raise UserError(
            f"{origin}: --init {init} needs the features the classifier reads ({name} "
            f"{expected}), these are of {node}"
        )
    return classifier_head(backbone.imagenet_classifier(network), wnids, init)


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
