"""The sweep's loop: every head of the grid trained at once, each epoch checkpointed, the best kept.

It runs the loop `training.train` runs (`loop.run_epochs`, of which one ordinary head is the
case K = 1) and reuses its parts: the epoch's batches (`loop.train_pass`: the same seeded
generator, so every head sees the batches an ordinary run with the same seed sees, in the same
order), the starting weights of `training.new_run`, and `training.record`, which keeps each
head's history and best epoch as it keeps an ordinary run's. What differs is the layer
(`wide.WideLayer`: K heads, one product per view) and what is saved each epoch: ``sweep.pt``
holds every head's weights, Adam state, history and best weights, and the generator, so a sweep
killed at any moment continues with ``--resume`` to the same end. A head whose train loss turns
NaN or infinite is dropped from the selection (its rows stay NaN in the layer, which touches no
other head) and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from extract.errors import UserError, first_line
from head import checkpoint, loop, training, wide
from head.features import FeatureSet, SplitTensors, StreamedSplit
from head.grid import Cell
from head.scoring import Scores
from head.settings import Settings, changed_settings

STATE = "sweep.pt"


@dataclasses.dataclass
class HeadRun:
    """One head's history and best epoch, with the fields `training.record` keeps for a `Run`."""

    history: dict[str, list] = dataclasses.field(default_factory=checkpoint.empty_history)
    epoch: int = 0
    best_epoch: int = -1
    best_top1: float = 0.0  # val top-1 at the best epoch (train top-1 without val)
    best_score: float = math.nan
    best_loss: float = math.nan  # val (or train) loss at the best epoch: breaks ties between heads


@dataclasses.dataclass
class Sweep:
    """Everything that changes while sweeping; `state` turns it into ``sweep.pt``."""

    layer: wide.WideLayer
    generator: torch.Generator
    best_weight: torch.Tensor  # (K*C, D): each head's exported layer at its best epoch
    best_bias: torch.Tensor
    heads: list[HeadRun]
    dropped: dict[int, str] = dataclasses.field(default_factory=dict)
    epoch: int = 0


def new_sweep(
    data: FeatureSet, train, cells: list[Cell], settings: Settings, device: torch.device
) -> Sweep:
    """Every head starts where `training.new_run` starts an ordinary run with its settings."""
    on_train = dataclasses.replace(data, train=train)
    starts = {
        view: training.new_run(on_train, dataclasses.replace(settings, standardize=view), device)
        for view in sorted({cell.standardize for cell in cells})
    }
    standardized = starts.get(True)
    layer = wide.new_layer(
        cells,
        starts[False].head if False in starts else standardized.head,
        None if standardized is None else standardized.head,
        None if standardized is None else standardized.mean,
        None if standardized is None else standardized.std,
    )
    weight, bias = wide.exported(layer)
    return Sweep(
        layer=layer,
        generator=torch.Generator().manual_seed(settings.seed),
        best_weight=weight.clone(),
        best_bias=bias.clone(),
        heads=[HeadRun() for _ in cells],
    )


def train_epoch(sweep: Sweep, train, settings: Settings, bar: tqdm) -> list[Scores]:
    """One pass over the train split in the generator's order; every head's running scores."""
    layer = sweep.layer
    step = functools.partial(wide.train_step, layer)
    device = layer.weight.device
    return loop.train_pass(train, settings, sweep.generator, device, layer.heads, step, bar)


def head_scores(weight: torch.Tensor, bias: torch.Tensor, classes: int, split, device) -> list:
    if split is None:
        return [Scores(math.nan, math.nan, math.nan)] * (len(bias) // classes)
    measured = wide.split_scores(weight, bias, classes, split, device)
    return [
        Scores(loss, top1, top5)
        for loss, top1, top5 in zip(
            measured.loss.tolist(), measured.top1.tolist(), measured.top5.tolist()
        )
    ]


def record(
    sweep: Sweep,
    epoch: int,
    train_scores: list[Scores],
    val_scores: list[Scores],
    seconds: float,
    has_val: bool,
    exported: tuple[torch.Tensor, torch.Tensor],
    report: Callable[[str], None],
) -> None:
    """Each head's epoch into its history and its best kept, by `training.record` itself; a
    head whose train loss is not finite is dropped (and recorded no further)."""
    classes = sweep.layer.classes
    for index, (cell, run, train_head, val_head) in enumerate(
        zip(sweep.layer.cells, sweep.heads, train_scores, val_scores)
    ):
        if index in sweep.dropped:
            continue
        if not math.isfinite(train_head.loss):
            sweep.dropped[index] = (
                f"the train loss is {train_head.loss} at epoch {epoch}; dropped from the selection"
            )
            report(f"note: head {describe(cell)}: {sweep.dropped[index]}")
            continue
        if training.record(run, epoch, train_head, val_head, seconds, has_val):
            run.best_loss = val_head.loss if has_val else train_head.loss
            rows = slice(index * classes, (index + 1) * classes)
            sweep.best_weight[rows] = exported[0][rows]
            sweep.best_bias[rows] = exported[1][rows]
    sweep.epoch = epoch


def describe(cell: Cell) -> str:
    view = "standardized" if cell.standardize else "raw"
    return f"lr {cell.lr:g} wd {cell.weight_decay:g} {view}"


def leader(sweep: Sweep) -> int | None:
    """The head selected so far: the highest best score, ties broken by the lower loss."""
    kept = [head for head in range(sweep.layer.heads) if head not in sweep.dropped]
    kept = [head for head in kept if not math.isnan(sweep.heads[head].best_score)]
    if not kept:
        return None
    return max(kept, key=lambda head: (sweep.heads[head].best_score, -sweep.heads[head].best_loss))


def epoch_line(sweep: Sweep, epoch: int, epochs: int, val: list[Scores], seconds: float) -> str:
    finite = [
        (score.top1, head)
        for head, score in enumerate(val)
        if head not in sweep.dropped and not math.isnan(score.top1)
    ]
    heads = f"{sweep.layer.heads} heads"
    if not finite:
        return f"epoch {epoch}/{epochs}  {heads}  {seconds:.1f} s"
    top, head = max(finite)
    low = min(finite)[0]
    return (
        f"epoch {epoch}/{epochs}  {heads}: val top1 {low:.1f}% to {top:.1f}% "
        f"(best {describe(sweep.layer.cells[head])})  {seconds:.1f} s"
    )


def state(sweep: Sweep, data: FeatureSet, settings: Settings, holdout: float | None) -> dict:
    """``sweep.pt``: what resuming needs, tensors and plain data only (loads weights_only)."""
    layer = sweep.layer
    return {
        "epoch": sweep.epoch,
        "cells": [[cell.lr, cell.weight_decay, cell.standardize] for cell in layer.cells],
        "args": settings.recorded(),
        "holdout": holdout,
        "features": dict(data.provenance),
        "numeric_class_names": list(data.wnids),
        "weight": layer.weight.detach().cpu().clone(),
        "bias": layer.bias.detach().cpu().clone(),
        "optimizer": layer.optimizer.state_dict(),
        "standardization": None
        if layer.mean is None
        else {"mean": layer.mean.cpu(), "std": layer.std.cpu()},
        "generator": sweep.generator.get_state(),
        "best_weight": sweep.best_weight.cpu().clone(),
        "best_bias": sweep.best_bias.cpu().clone(),
        "heads": [dataclasses.asdict(run) for run in sweep.heads],
        "dropped": {str(head): note for head, note in sweep.dropped.items()},
    }


def resumed_sweep(
    path: Path,
    data: FeatureSet,
    cells: list[Cell],
    settings: Settings,
    holdout: float | None,
    device: torch.device,
) -> Sweep:
    """Rebuild the sweep from ``sweep.pt`` after checking it continues this very sweep."""
    saved = checkpoint.load_dict(path, "sweep state")
    checkpoint.check_trained_on(
        list(saved["numeric_class_names"]),
        dict(saved["features"]),
        saved["weight"].shape[1],
        str(path),
        data.path,
        data.provenance,
        data.wnids,
        data.feature_dim,
    )
    changed = changed_settings(saved["args"], settings, skip=("lr", "weight_decay", "standardize"))
    if [tuple(cell) for cell in saved["cells"]] != [
        (cell.lr, cell.weight_decay, cell.standardize) for cell in cells
    ]:
        changed.append("--lr, --weight-decay or --standardize: another grid")
    if saved["holdout"] != holdout:
        changed.append(f"--holdout {saved['holdout']} -> {holdout}")
    if changed:
        raise UserError(f"{path}: cannot resume with other settings ({'; '.join(changed)})")
    standard = saved["standardization"]
    layer = wide.WideLayer(
        weight=saved["weight"].to(device),
        bias=saved["bias"].to(device),
        classes=data.num_classes,
        cells=list(cells),
        mean=None if standard is None else standard["mean"].to(device),
        std=None if standard is None else standard["std"].to(device),
    )
    layer.optimizer.load_state_dict(saved["optimizer"])
    generator = torch.Generator()
    generator.set_state(saved["generator"])
    return Sweep(
        layer=layer,
        generator=generator,
        best_weight=saved["best_weight"].to(device),
        best_bias=saved["best_bias"].to(device),
        heads=[HeadRun(**run) for run in saved["heads"]],
        dropped={int(head): note for head, note in saved["dropped"].items()},
        epoch=int(saved["epoch"]),
    )


def save_state(
    sweep: Sweep, data: FeatureSet, settings: Settings, holdout: float | None, save_dir: Path
) -> None:
    try:
        checkpoint.save_dict(state(sweep, data, settings, holdout), save_dir / STATE)
    except OSError as error:
        raise UserError(
            f"{save_dir}: cannot save epoch {sweep.epoch} ({error.strerror or first_line(error)}); "
            f"{STATE} holds the epochs before, free some space and rerun with --resume"
        ) from None


def sweep_heads(
    data: FeatureSet,
    train: SplitTensors | StreamedSplit,
    selection: SplitTensors | StreamedSplit | None,
    save_dir: Path,
    cells: list[Cell],
    settings: Settings,
    device: torch.device,
    holdout: float | None,
    report: Callable[[str], None],
) -> Sweep:
    """Train (or resume) every head of the grid for ``settings.epochs``, selecting on
    `selection` (val, or the held-out train rows); returns the finished sweep."""
    save_dir.mkdir(parents=True, exist_ok=True)
    has_val = selection is not None
    sweep = (
        resumed_sweep(save_dir / STATE, data, cells, settings, holdout, device)
        if settings.resume
        else new_sweep(data, train, cells, settings, device)
    )
    classes = data.num_classes
    exported = None  # every head's layer as last scored, which `finish` records as scored

    def scores(split) -> list[Scores]:
        nonlocal exported
        exported = wide.exported(sweep.layer)
        return head_scores(*exported, classes, split, device)

    def finish(epoch: int, train_scores: list, val_scores: list, seconds: float) -> None:
        record(sweep, epoch, train_scores, val_scores, seconds, has_val, exported, report)
        report(epoch_line(sweep, epoch, settings.epochs, val_scores, seconds))
        save_state(sweep, data, settings, holdout, save_dir)

    loop.run_epochs(
        sweep.epoch,
        bool(sweep.heads[0].history["epoch"]),
        train,
        selection,
        settings,
        device,
        lambda bar: train_epoch(sweep, train, settings, bar),
        scores,
        finish,
    )
    return sweep
