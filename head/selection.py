"""A sweep from start to report: check the grid, train it, pick the best head, save and report.

The order is the user's guarantee that nothing is wasted: every input (the grid, k, the holdout
fraction, the grid's memory) is checked against the file's shapes before any feature is read;
then the heads train (`sweeping.sweep_heads`); then the winner is chosen on the selection split
(validation by default, or with ``holdout`` a seeded part of train, so that validation stays
an unbiased estimate) by top-1, ties broken by the lower loss, and saved as an ordinary
checkpoint, ``best.pt``, that records the settings that won and the sweep they came from.
With a holdout, the winner's settings are trained again on the whole train split for the
winner's best number of epochs (in ``refit/``), and that run's last epoch is ``best.pt``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from extract import store
from extract.device import available_memory
from extract.errors import UserError
from head import checkpoint, grid, sweep_report, sweeping, training
from head import features as feature_sets
from head.features import FeatureSet, SplitTensors
from head.grid import Cell
from head.training import Settings

HEADS = "heads"  # --save-all: one folder per head
REFIT = "refit"  # --holdout: the winner trained again on the whole train split


@dataclasses.dataclass
class Plan:
    """What a sweep will do, settled before any work."""

    cells: list[Cell]
    settings: Settings
    holdout: float | None
    knn: tuple[int, ...]
    ridge: bool
    save_all: bool


def file_shape(path: Path) -> tuple[int, int, int]:
    """(train rows, classes, feature width) of a complete feature file, read from its header."""
    with store.open_complete(path) as file:
        if not store.has_split(file, "train"):
            raise UserError(f"{path}: no 'train' split; extract with --splits train,val")
        return (
            store.split_info(file, "train").rows,
            len(store.read_classes(file).wnids),
            store.feature_dim(file),
        )


def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        return min(available_memory(), torch.cuda.mem_get_info(device)[0])
    return available_memory()


def holdout_splits(
    data: FeatureSet, fraction: float, seed: int
) -> tuple[SplitTensors, SplitTensors]:
    """(rows trained on, rows selected on) of the in-memory train split."""
    if not isinstance(data.train, SplitTensors):
        raise UserError(
            f"--holdout: needs the train split in memory, {data.path} is streamed here "
            f"(give more --max-memory, or select on val without --holdout)"
        )
    kept, held = (
        rows.to(data.train.labels.device)
        for rows in grid.holdout_rows(len(data.train), fraction, seed)
    )

    def part(rows: torch.Tensor, name: str) -> SplitTensors:
        flip = data.train.features_flip
        return SplitTensors(
            name=name,
            features=data.train.features.index_select(0, rows),
            labels=data.train.labels.index_select(0, rows),
            features_flip=None if flip is None else flip.index_select(0, rows),
        )

    return part(kept, "train"), part(held, "holdout")


def head_row(sweep: sweeping.Sweep, head: int, has_val: bool, seconds: float) -> dict:
    cell = sweep.layer.cells[head]
    best = sweep.best[head]
    past = sweep.histories[head]
    at = past["history_epochs"].index(best.epoch) if best.epoch in past["history_epochs"] else None
    return {
        "method": "adam",
        "lr": cell.lr,
        "weight_decay": cell.weight_decay,
        "standardize": cell.standardize,
        "best_epoch": None if at is None else best.epoch,
        "val_top1": math.nan if at is None or not has_val else past["validation_accuracy"][at],
        "val_top5": math.nan if at is None or not has_val else past["validation_top5"][at],
        "val_loss": math.nan if at is None or not has_val else past["validation_loss"][at],
        "train_top1": math.nan if at is None else past["train_accuracy"][at],
        "seconds": seconds,
        "best": False,
        "note": sweep.dropped.get(head, ""),
    }


def head_history(sweep: sweeping.Sweep, head: int, until: int) -> dict[str, list]:
    """Head `head`'s history lists up to epoch `until`, as its own run's checkpoint holds them."""
    past = sweep.histories[head]
    count = past["history_epochs"].index(until) + 1
    return {key: list(values[:count]) for key, values in past.items()}


def head_checkpoint(
    sweep: sweeping.Sweep,
    head: int,
    data: FeatureSet,
    settings: Settings,
    record: dict,
) -> dict:
    """Head `head` at its best epoch as an ordinary checkpoint: what `head.evaluate`, `live`
    and the rest read, with the settings it trained with and the sweep it came from."""
    cell = sweep.layer.cells[head]
    best = sweep.best[head]
    rows = slice(head * sweep.layer.classes, (head + 1) * sweep.layer.classes)
    own = dataclasses.replace(
        settings, lr=cell.lr, weight_decay=cell.weight_decay, standardize=cell.standardize
    )
    return {
        "epoch": best.epoch,
        "best_accuracy": best.accuracy,
        "best_epoch": best.epoch,
        "state_dict": {
            "weight": sweep.best_weight[rows].cpu().float().clone(),
            "bias": sweep.best_bias[rows].cpu().float().clone(),
        },
        "optimizer": sweep.layer.optimizers[head].state_dict(),
        **head_history(sweep, head, best.epoch),
        "numeric_class_names": list(data.wnids),
        "tiny_class": dict(zip(data.wnids, data.names)),
        "features": dict(data.provenance),
        "selection": record["selection"],
        "args": own.recorded(),
        "sweep": record,
    }


def sweep_record(plan: Plan, has_val: bool) -> dict:
    """How best.pt was chosen: the grid, the split it was selected on."""
    if plan.holdout is not None:
        selection = f"holdout top-1 ({plan.holdout:g} of train), refit on all of train"
    else:
        selection = "validation top-1" if has_val else "train loss"
    return {
        "selection": selection,
        "holdout": plan.holdout,
        "lr": sorted({cell.lr for cell in plan.cells}),
        "weight_decay": sorted({cell.weight_decay for cell in plan.cells}),
        "standardize": sorted({cell.standardize for cell in plan.cells}),
        "knn": list(plan.knn),
        "ridge": plan.ridge,
    }


def refit(
    features_path: Path,
    save_dir: Path,
    cell: Cell,
    epochs: int,
    settings: Settings,
    device: torch.device,
    stream: bool | None,
    max_memory: int | None,
    report: Callable[[str], None],
) -> dict:
    """The winner's settings trained again on the whole train split for `epochs` epochs; its
    last epoch is the head (val is measured, but chooses nothing)."""
    folder = save_dir / REFIT
    done = folder / checkpoint.LAST
    own = dataclasses.replace(
        settings,
        lr=cell.lr,
        weight_decay=cell.weight_decay,
        standardize=cell.standardize,
        epochs=epochs,
        resume=done.is_file(),
        overwrite=not done.is_file(),
    )
    data = feature_sets.load(
        features_path,
        flip=own.flip,
        device=device,
        report=report,
        stream=stream,
        max_memory=max_memory,
    )
    training.train(data, folder, own, device, report=lambda line: None)
    return checkpoint.load(done)


def run(
    features_path: Path,
    save_dir: Path,
    plan: Plan,
    device: torch.device,
    stream: bool | None,
    max_memory: int | None,
    report: Callable[[str], None],
) -> list[dict]:
    """The whole sweep (see the module's docstring); returns the report's rows."""
    settings = plan.settings
    sweeping.check_save_dir(save_dir, settings)
    train_rows, classes, feature_dim = file_shape(features_path)
    grid.knn_values(plan.knn or None, train_rows)
    grid.check_memory(len(plan.cells), classes, feature_dim, memory_available(device))
    if settings.overwrite:  # what an earlier sweep here left beside its state
        for folder in (REFIT, HEADS):
            shutil.rmtree(save_dir / folder, ignore_errors=True)
    data = feature_sets.load(
        features_path,
        flip=settings.flip,
        device=device,
        report=report,
        stream=stream,
        max_memory=max_memory,
    )
    if settings.flip and not (
        data.train.flip if data.streamed else data.train.features_flip is not None
    ):
        settings = dataclasses.replace(settings, flip=False)
    if plan.holdout is not None:
        train, selection = holdout_splits(data, plan.holdout, settings.seed)
        data.train = None  # the two parts replace it: memory for one copy, not two
    else:
        train, selection = data.train, data.val
    has_val = selection is not None
    if not has_val:
        report(
            f"note: {features_path} has no val split; sweeping anyway and selecting "
            f"on the lowest train loss"
        )
    sweep = sweeping.sweep_heads(
        data, train, selection, save_dir, plan.cells, settings, device, plan.holdout, report
    )
    seconds = sum(sweep.histories[0]["time"]) / sweep.layer.heads
    rows = [head_row(sweep, head, has_val, seconds) for head in range(sweep.layer.heads)]
    winner = sweeping.leader(sweep)
    if winner is None:
        raise UserError(
            f"{save_dir}: every head's train loss turned NaN or infinite; lower --lr "
            f"(the per-head notes above say when)"
        )
    rows[winner]["best"] = True
    record = sweep_record(plan, has_val)
    best_state = head_checkpoint(sweep, winner, data, settings, record)
    if plan.save_all:
        for head, cell in enumerate(plan.cells):
            if head not in sweep.dropped and sweep.best[head].epoch >= 0:
                folder = save_dir / HEADS / cell.name
                folder.mkdir(parents=True, exist_ok=True)
                state = head_checkpoint(sweep, head, data, settings, record)
                checkpoint.save_atomic(state, folder / checkpoint.BEST)
    best_history = head_history(sweep, winner, sweep.epoch)
    del sweep, train, selection, data
    if plan.holdout is not None:
        best_state = refit(
            features_path,
            save_dir,
            plan.cells[winner],
            max(best_state["best_epoch"], 1),
            settings,
            device,
            stream,
            max_memory,
            report,
        )
        best_state = {
            **best_state,
            "best_epoch": best_state["epoch"],
            "best_accuracy": best_state["validation_accuracy"][-1],
            "selection": record["selection"],
            "sweep": record,
        }
    checkpoint.save_atomic(best_state, save_dir / checkpoint.BEST)
    sweep_report.write_csv(rows, save_dir / sweep_report.CSV)
    sweep_report.write_png(
        rows,
        best_history,
        save_dir / sweep_report.PNG,
        "holdout" if plan.holdout is not None else "val",
    )
    return rows
