"""The sweep's zero-training rows: weighted k-NN (`head.knn`) and the ridge probe (`head.ridge`).

Both are measured on the sweep's selection split (val, or the held-out train rows), so their
rows compare with the heads'. k-NN is reported only: it is no linear layer. Each ridge solution
is a linear layer on raw features; its scores become probabilities through softmax(logits / T)
with T fitted on the selection split (`ridge.fit_temperature`), so its loss is an NLL like the
heads', and the best ridge layer may win ``best.pt`` with 1/T folded into its weight and bias.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from head import knn, ridge
from head.features import SplitTensors, StreamedSplit, split_blocks


@dataclasses.dataclass
class RidgeLayer:
    """One ridge solution as a layer whose softmax gives calibrated probabilities."""

    weight: torch.Tensor  # (C, D) float32 on raw features, already divided by `temperature`
    bias: torch.Tensor
    l2: float
    standardize: bool
    temperature: float


def knn_rows(
    train: SplitTensors | StreamedSplit,
    selection: SplitTensors | StreamedSplit,
    ks: tuple[int, ...],
    classes: int,
    device: torch.device,
) -> list[dict]:
    """One row per k, from one search for the largest."""
    started = time.perf_counter()
    results = knn.classify(train, selection, ks, classes, device=device)
    seconds = time.perf_counter() - started
    return [
        {
            "method": f"knn k={k}",
            "val_top1": result.top1,
            "val_top5": result.top5,
            "val_loss": math.nan,
            "train_top1": math.nan,
            "seconds": seconds,
            "best": False,
            "note": "",
        }
        for k, result in results.items()
    ]


def all_logits(
    weight: torch.Tensor, bias: torch.Tensor, split: SplitTensors | StreamedSplit, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every layer stacked in `weight`, labels) over the split, float32."""
    logits, labels = [], []
    for features, split_labels in split_blocks(split, 1024, device):
        logits.append(torch.addmm(bias, features.float(), weight.t()))
        labels.append(split_labels)
    return torch.cat(logits), torch.cat(labels)


def ridge_rows(
    train: SplitTensors | StreamedSplit,
    selection: SplitTensors | StreamedSplit,
    views: list[bool],
    classes: int,
    device: torch.device,
) -> tuple[list[dict], list[RidgeLayer]]:
    """One row (and layer) per l2 value and standardize setting in `views`, from one pass over
    the train split and one eigendecomposition per setting."""
    started = time.perf_counter()
    stats = ridge.moments(train, classes)
    rows, layers = [], []
    for standardize in views:
        fit = ridge.solve(stats, None, standardize)
        count = len(fit.l2)
        weight = fit.weights.reshape(count * classes, -1).to(device)
        bias = fit.biases.reshape(-1).to(device)
        logits, labels = all_logits(weight, bias, selection, device)
        for index, l2 in enumerate(fit.l2):
            scores = logits[:, index * classes : (index + 1) * classes].double().cpu()
            temperature = ridge.fit_temperature(scores, labels.cpu())
            scaled = scores / temperature
            top = scaled.topk(min(5, classes), dim=1).indices == labels.cpu()[:, None]
            rows.append(
                {
                    "method": "ridge",
                    "weight_decay": l2,
                    "standardize": standardize,
                    "val_top1": 100.0 * top[:, 0].double().mean().item(),
                    "val_top5": 100.0 * top.any(dim=1).double().mean().item(),
                    "val_loss": ridge.nll(scores, labels.cpu(), temperature),
                    "train_top1": math.nan,
                    "seconds": 0.0,
                    "best": False,
                    "note": f"T {temperature:.3g}",
                }
            )
            layers.append(
                RidgeLayer(
                    weight=fit.weights[index] / temperature,
                    bias=fit.biases[index] / temperature,
                    l2=l2,
                    standardize=standardize,
                    temperature=temperature,
                )
            )
    seconds = time.perf_counter() - started
    for row in rows:
        row["seconds"] = seconds
    return rows, layers


def refit_ridge(
    train: SplitTensors | StreamedSplit, chosen: RidgeLayer, classes: int
) -> RidgeLayer:
    """The chosen l2 and standardisation solved again on `train` (all of it, after a holdout
    selection), keeping the temperature fitted on the selection split."""
    fit = ridge.solve(ridge.moments(train, classes), [chosen.l2], chosen.standardize)
    return dataclasses.replace(
        chosen,
        weight=fit.weights[0] / chosen.temperature,
        bias=fit.biases[0] / chosen.temperature,
    )
