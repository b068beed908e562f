"""The head: one linear layer from fc7 (4096) to the dataset's classes, replacing AlexNet's fc8."""

from __future__ import annotations

import torch
from torch import nn

from extract.backbone import FEATURE_DIM
from extract.errors import UserError


def new_head(num_classes: int) -> nn.Linear:
    return nn.Linear(FEATURE_DIM, num_classes)


def head_from_state(state_dict: dict[str, torch.Tensor], origin: str = "checkpoint") -> nn.Linear:
    """Rebuild the head from a checkpoint's ``state_dict`` (exactly ``weight`` and ``bias``)."""
    if set(state_dict) != {"weight", "bias"}:
        raise UserError(f"{origin}: state_dict must hold exactly 'weight' and 'bias'")
    weight, bias = state_dict["weight"], state_dict["bias"]
    if weight.ndim != 2 or weight.shape[1] != FEATURE_DIM or bias.shape != weight.shape[:1]:
        raise UserError(f"{origin}: head weight {tuple(weight.shape)} / bias "
                        f"{tuple(bias.shape)} do not fit a 4096 -> C linear layer")
    head = new_head(weight.shape[0])
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()
