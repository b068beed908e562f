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
from head import checkpoint, grid, knn, sweep_report, sweeping, training
from head import features as feature_sets
from head.checkpoint import Checkpoint
from head.features import FeatureSet, SplitTensors, StreamedSplit
from head.grid import Cell
from head.settings import Settings

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
) -> tuple[SplitTensors | StreamedSplit, SplitTensors | StreamedSplit]:
    """(rows trained on, rows selected on) of the train split, in memory or streamed: the same
    seeded rows either way (`grid.holdout_rows`)."""
    kept, held = grid.holdout_rows(len(data.train), fraction, seed)
    if isinstance(data.train, StreamedSplit):
        return data.train.part(kept), dataclasses.replace(data.train.part(held), flip=False)
    kept, held = (rows.to(data.train.labels.device) for rows in (kept, held))

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
    run = sweep.heads[head]
    past = run.history
    at = past["epoch"].index(run.best_epoch) if run.best_epoch in past["epoch"] else None
    return {
        "method": "adam",
        "lr": cell.lr,
        "weight_decay": cell.weight_decay,
        "standardize": cell.standardize,
        "best_epoch": None if at is None else run.best_epoch,
        "val_top1": math.nan if at is None or not has_val else past["val_top1"][at],
        "val_top5": math.nan if at is None or not has_val else past["val_top5"][at],
        "val_loss": math.nan if at is None or not has_val else past["val_loss"][at],
        "train_top1": math.nan if at is None else past["train_top1"][at],
        "seconds": seconds,
        "best": False,
        "note": sweep.dropped.get(head, ""),
    }


def head_checkpoint(
    sweep: sweeping.Sweep, head: int, data: FeatureSet, settings: Settings, record: dict
) -> Checkpoint:
    """Head `head` at its best epoch as an ordinary checkpoint: what `head.evaluate`, `live`
    and the rest read, with the settings it trained with and the sweep it came from. Its
    history runs to that epoch, as the best.pt of its own run; its Adam state is the last."""
    cell = sweep.layer.cells[head]
    run = sweep.heads[head]
    rows = slice(head * sweep.layer.classes, (head + 1) * sweep.layer.classes)
    own = dataclasses.replace(
        settings, lr=cell.lr, weight_decay=cell.weight_decay, standardize=cell.standardize
    )
    count = run.history["epoch"].index(run.best_epoch) + 1
    return Checkpoint(
        weight=sweep.best_weight[rows].cpu().float().clone(),
        bias=sweep.best_bias[rows].cpu().float().clone(),
        wnids=list(data.wnids),
        class_names=dict(zip(data.wnids, data.names)),
        provenance=dict(data.provenance),
        epoch=run.best_epoch,
        best_top1=run.best_top1,
        history={key: list(values[:count]) for key, values in run.history.items()},
        optimizer_state=sweep.layer.head_optimizer_state(head),
        best_epoch=run.best_epoch,
        best_by=record["selection"],
        settings=own.recorded(),
        selected_from=record,
    )


def ridge_checkpoint(
    layer, data: FeatureSet, settings: Settings, record: dict, top1: float
) -> Checkpoint:
    """The chosen ridge solution as an ordinary checkpoint; 1/T is folded into the layer, so
    a softmax of its logits gives the calibrated probabilities."""
    return Checkpoint(
        weight=layer.weight.cpu().float().contiguous(),
        bias=layer.bias.cpu().float().contiguous(),
        wnids=list(data.wnids),
        class_names=dict(zip(data.wnids, data.names)),
        provenance=dict(data.provenance),
        epoch=0,
        best_top1=top1,
        best_epoch=0,
        best_by=record["selection"],
        settings={
            "method": "ridge",
            "l2": layer.l2,
            "standardize": layer.standardize,
            "temperature": layer.temperature,
            "seed": settings.seed,
        },
        selected_from=record,
    )


def sweep_record(plan: Plan, has_val: bool) -> dict:
    """How best.pt was chosen: the grid, the split it was selected on."""
    if plan.holdout is not None:
        selection = f"holdout top-1 ({plan.holdout:g} of train), refit on all of train"
    else:
        selection = checkpoint.best_by(has_val)
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
    data: FeatureSet,
    save_dir: Path,
    cell: Cell,
    epochs: int,
    settings: Settings,
    device: torch.device,
) -> Checkpoint:
    """The winner's settings trained again on the whole train split for `epochs` epochs; its
    last epoch is the head (val is measured, but chooses nothing)."""
    folder = save_dir / REFIT
    done = (folder / checkpoint.LAST).is_file()
    own = dataclasses.replace(
        settings,
        lr=cell.lr,
        weight_decay=cell.weight_decay,
        standardize=cell.standardize,
        epochs=epochs,
        resume=done,
        overwrite=not done,
    )
    training.train(data, folder, own, device, report=lambda line: None)
    return checkpoint.load(folder / checkpoint.LAST)


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
    training.check_save_dir(save_dir, sweeping.STATE, "sweep", settings)
    train_rows, classes, feature_dim = file_shape(features_path)
    if plan.knn:
        held = 0 if plan.holdout is None else grid.held_rows(train_rows, plan.holdout)
        knn.check_ks(plan.knn, train_rows - held)
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
    if settings.flip and not data.has_flip:
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
    seconds = sum(sweep.heads[0].history["seconds"]) / sweep.layer.heads
    rows = [head_row(sweep, head, has_val, seconds) for head in range(sweep.layer.heads)]
    winner = sweeping.leader(sweep)
    if winner is None:
        raise UserError(
            f"{save_dir}: every head's train loss turned NaN or infinite; lower --lr "
            f"(the per-head notes above say when)"
        )
    record = sweep_record(plan, has_val)
    best = head_checkpoint(sweep, winner, data, settings, record)
    if plan.save_all:
        for head, cell in enumerate(plan.cells):
            if head not in sweep.dropped and sweep.heads[head].best_epoch >= 0:
                folder = save_dir / HEADS / cell.name
                folder.mkdir(parents=True, exist_ok=True)
                state = head_checkpoint(sweep, head, data, settings, record)
                checkpoint.save(state, folder / checkpoint.BEST)
    best_history = sweep.heads[winner].history
    del sweep  # the baselines and the refit need the memory the heads held
    best_row, chosen_ridge = rows[winner], None
    if (plan.knn or plan.ridge) and not has_val:
        report("note: no split to measure k-NN and ridge on; --knn and --ridge skipped")
    elif plan.knn or plan.ridge:
        from head import baselines  # scipy, for the ridge probe

        if plan.knn:
            rows += baselines.knn_rows(train, selection, plan.knn, classes, device)
        if plan.ridge:
            views = sorted({cell.standardize for cell in plan.cells})
            ridge_rows, layers = baselines.ridge_rows(train, selection, views, classes, device)
            rows += ridge_rows
            top = sweep_report.ranked([best_row, *ridge_rows])[0]
            if top is not best_row:
                best_row, chosen_ridge = top, layers[ridge_rows.index(top)]
    best_row["best"] = True
    if plan.holdout is not None:
        whole = feature_sets.load(
            features_path,
            flip=settings.flip,
            device=device,
            report=lambda line: None,
            stream=stream,
            max_memory=max_memory,
        )
        del train, selection, data
        if chosen_ridge is not None:
            chosen_ridge = baselines.refit_ridge(whole.train, chosen_ridge, classes)
        else:
            refitted = refit(
                whole, save_dir, plan.cells[winner], max(best.best_epoch, 1), settings, device
            )
            best = dataclasses.replace(
                refitted,
                best_epoch=refitted.epoch,
                best_top1=refitted.history["val_top1"][-1],
                best_by=record["selection"],
                selected_from=record,
            )
        data = whole
    if chosen_ridge is not None:
        best = ridge_checkpoint(chosen_ridge, data, settings, record, best_row["val_top1"])
    checkpoint.save(best, save_dir / checkpoint.BEST)
    sweep_report.write_csv(rows, save_dir / sweep_report.CSV)
    sweep_report.write_png(
        rows,
        best_history,
        save_dir / sweep_report.PNG,
        "holdout" if plan.holdout is not None else "val",
    )
    return rows
