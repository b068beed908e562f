"""One head trained on cached features: shuffle, batch, step, measure, checkpoint.

One epoch draws a permutation (and, with flipped features, a plain-or-flipped choice per image)
from a `torch.Generator` seeded with `--seed`, indexes the in-memory feature tensor with it (or,
streamed, draws the block order and the order within each buffer fill: `step.stream_batches`),
casts each batch to float32 and takes an Adam step on the cross-entropy of the logits
(`head.step`). The generator's state is saved in every checkpoint, so a resumed run draws
exactly what an uninterrupted one would have. On CUDA, with the features in memory, the epoch
is replayed from CUDA graphs (`head.graphs`); the eager loop here is the reference it is
tested against. The epochs are walked by `loop.run_epochs`, the loop `head.sweep` runs for a
grid of heads: one head is its case K = 1.

Validation is measured on the exported layer (standardisation folded in, applied to the raw
features), so `best_accuracy` is what `head.evaluate` recomputes from `best.pt`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from extract.errors import Option, UserError, first_line
from head import checkpoint, history, loop
from head.adam import Adam
from head.checkpoint import Checkpoint
from head.features import (
    FeatureSet,
    SplitTensors,
    StreamedSplit,
    replay_set,
    split_blocks,
    standardization,
)
from head.graphs import EpochGraph, graphed_epoch, uses_graphs
from head.model import (
    fold_standardization,
    initial_head,
    pretrained_classifier_head,
    unfold_standardization,
)
from head.scoring import Scores, split_scores
from head.settings import PRETRAINED_INITS, Settings, changed_settings
from head.step import train_step


@dataclasses.dataclass
class Run:
    """Everything that changes while training; `to_checkpoint` turns it into a `Checkpoint`."""

    head: nn.Linear  # trained in standardised space when `mean` is set
    optimizer: Adam
    generator: torch.Generator
    mean: torch.Tensor | None
    std: torch.Tensor | None
    history: dict[str, list] = dataclasses.field(default_factory=checkpoint.empty_history)
    epoch: int = 0
    best_epoch: int = -1
    best_top1: float = 0.0
    best_score: float = math.nan
    graph: EpochGraph | None = None  # built at the first graphed epoch, replayed by the rest
    replay: dict[str, torch.Tensor] | None = None  # checkpoint.replay_entry of the train split

    def exported(self) -> dict[str, torch.Tensor]:
        """The layer on raw features: what the checkpoint's `weight` and `bias` hold."""
        weight, bias = self.head.weight.detach(), self.head.bias.detach()
        if self.mean is not None:
            return fold_standardization(weight, bias, self.mean, self.std)
        return {"weight": weight.clone(), "bias": bias.clone()}


def train_epoch(
    run: Run, train: SplitTensors | StreamedSplit, settings: Settings, bar: tqdm
) -> Scores:
    """One pass over the train split in the generator's order; returns running loss and top-1:
    `loop.train_pass` with one head, or its CUDA-graph replay."""
    run.head.train()
    if uses_graphs(run, train, settings):
        return graphed_epoch(run, train, settings, bar)
    device = run.head.weight.device
    step = functools.partial(train_step, run)
    (scores,) = loop.train_pass(train, settings, run.generator, device, 1, step, bar)
    return scores


def validate(run: Run, val: SplitTensors | StreamedSplit | None) -> Scores:
    if val is None:
        return Scores(math.nan, math.nan, math.nan)
    return split_scores(run.exported(), val, run.head.weight.device)


def record(
    run: Run, epoch: int, train_scores: Scores, val_scores: Scores, seconds: float, has_val: bool
) -> bool:
    """Append one epoch to the history; returns whether it is the best so far."""
    for key, value in (
        ("epoch", epoch),
        ("train_loss", train_scores.loss),
        ("train_top1", train_scores.top1),
        ("val_loss", val_scores.loss),
        ("val_top1", val_scores.top1),
        ("val_top5", val_scores.top5),
        ("seconds", seconds),
    ):
        run.history[key].append(value)
    run.epoch = epoch
    # Higher val top-1 is better; without val, lower train loss (negated to compare alike).
    score = val_scores.top1 if has_val else -train_scores.loss
    if math.isnan(run.best_score) or score > run.best_score:
        run.best_score = score
        run.best_epoch = epoch
        run.best_top1 = val_scores.top1 if has_val else train_scores.top1
        return True
    return False


def epoch_line(
    epoch: int, epochs: int, train_scores: Scores, val_scores: Scores, seconds: float
) -> str:
    val = (
        "val -"
        if math.isnan(val_scores.loss)
        else f"val loss {val_scores.loss:.3f} top1 {val_scores.top1:.1f}% "
        f"top5 {val_scores.top5:.1f}%"
    )
    return (
        f"epoch {epoch}/{epochs}  train loss {train_scores.loss:.3f} "
        f"top1 {train_scores.top1:.1f}%  {val}  {seconds:.1f} s"
    )


def to_checkpoint(run: Run, data: FeatureSet, settings: Settings, has_val: bool) -> Checkpoint:
    """The run as a checkpoint: the layer on raw features, the provenance, and what resuming
    needs."""
    exported = run.exported()
    return Checkpoint(
        weight=exported["weight"].cpu().float(),
        bias=exported["bias"].cpu().float(),
        wnids=list(data.wnids),
        class_names=dict(zip(data.wnids, data.names)),
        provenance=dict(data.provenance),
        epoch=run.epoch,
        best_top1=run.best_top1,
        history={key: list(values) for key, values in run.history.items()},
        optimizer_state=run.optimizer.state_dict(),
        best_epoch=run.best_epoch,
        best_by=checkpoint.best_by(has_val),
        settings=settings.recorded(),
        generator_state=run.generator.get_state(),
        trained_layer={
            name: value.detach().cpu().clone() for name, value in run.head.state_dict().items()
        },
        standardization=None
        if run.mean is None
        else {"mean": run.mean.cpu(), "std": run.std.cpu()},
        replay=run.replay,
    )


def adam(head: nn.Linear, settings: Settings) -> Adam:
    return Adam([head.weight, head.bias], lr=settings.lr, weight_decay=settings.weight_decay)


def new_run(data: FeatureSet, settings: Settings, device: torch.device) -> Run:
    mean = std = None
    if settings.standardize:
        mean, std = standardization(
            features for features, _ in split_blocks(data.train, device=device)
        )
    if settings.init in PRETRAINED_INITS:
        head = pretrained_classifier_head(
            data.provenance, data.wnids, str(data.path), settings.init
        )
        if mean is not None:
            with torch.no_grad():
                head.load_state_dict(
                    unfold_standardization(head.weight, head.bias, mean.cpu(), std.cpu())
                )
    else:
        head = initial_head(data.feature_dim, data.num_classes, settings.seed)
    head = head.to(device)
    optimizer = adam(head, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    return Run(head=head, optimizer=optimizer, generator=generator, mean=mean, std=std)


def resumed_run(path: Path, data: FeatureSet, settings: Settings, device: torch.device) -> Run:
    """Rebuild the run from `last.pt` after checking it continues this very training."""
    state = checkpoint.load(path)
    if state.settings is None or state.trained_layer is None or state.generator_state is None:
        raise UserError(f"{path}: not written by head.train (no training state); cannot resume")
    checkpoint.check_compatible(
        state, str(path), data.path, data.provenance, data.wnids, data.feature_dim
    )
    changed = changed_settings(state.settings, settings)
    if changed:
        raise UserError(f"{path}: cannot resume with other settings ({'; '.join(changed)})")
    head = initial_head(data.feature_dim, data.num_classes, settings.seed)
    head.load_state_dict(state.trained_layer)
    head = head.to(device)
    optimizer = adam(head, settings)
    optimizer.load_state_dict(state.optimizer_state)
    generator = torch.Generator()
    generator.set_state(state.generator_state)
    standard = state.standardization
    run = Run(
        head=head,
        optimizer=optimizer,
        generator=generator,
        mean=None if standard is None else standard["mean"].to(device),
        std=None if standard is None else standard["std"].to(device),
    )
    run.history = {key: list(values) for key, values in state.history.items()}
    run.epoch = state.epoch
    run.best_epoch = state.best_epoch
    run.best_top1 = state.best_top1
    best = run.history["epoch"].index(run.best_epoch)
    run.best_score = (
        run.history["val_top1"][best]
        if state.best_by == checkpoint.best_by(has_val=True)
        else -run.history["train_loss"][best]
    )
    return run


def save(
    run: Run, data: FeatureSet, settings: Settings, save_dir: Path, has_val: bool, is_best: bool
) -> Checkpoint:
    """best.pt (when this epoch is the best), then last.pt, then history.csv, each replaced
    whole. A write that fails (a full disk) stops the run with one line and leaves the files of
    the epoch before, or a best.pt one epoch ahead of last.pt, which --resume then redoes."""
    state = to_checkpoint(run, data, settings, has_val)
    try:
        if is_best:
            checkpoint.save(state, save_dir / checkpoint.BEST)
        checkpoint.save(state, save_dir / checkpoint.LAST)
        history.write_csv(state.history, save_dir / history.CSV)
    except OSError as error:
        raise UserError(
            f"{save_dir}: cannot save epoch {run.epoch} ({error.strerror or first_line(error)}); "
            f"last.pt and best.pt hold the epochs before, free some space and rerun with --resume"
        ) from None
    return state


def check_save_dir(save_dir: Path, state_file: str, noun: str, settings: Settings) -> None:
    """A saved `noun` (its `state_file` in `save_dir`) is continued only with --resume and
    replaced only with --overwrite; a run's is last.pt, a sweep's sweep.pt."""
    state = save_dir / state_file
    if save_dir.exists() and not save_dir.is_dir():
        raise UserError(f"{save_dir}: exists and is not a folder")
    if settings.resume and not state.is_file():
        raise UserError(
            f"{state}: nothing to resume (run without ", Option("resume", True), " to start)"
        )
    if not settings.resume and state.exists() and not settings.overwrite:
        raise UserError(
            f"{state}: a {noun} is already saved here (use ",
            Option("resume", True),
            " to continue it, or ",
            Option("overwrite", True),
            " to start again)",
        )


def train(
    data: FeatureSet, save_dir: Path, settings: Settings, device: torch.device, report=print
) -> Checkpoint:
    """Train (or resume training) the head on `data`; returns the last checkpoint."""
    check_save_dir(save_dir, checkpoint.LAST, "run", settings)
    last = save_dir / checkpoint.LAST
    if settings.flip and not data.has_flip:
        settings = dataclasses.replace(settings, flip=False)
    save_dir.mkdir(parents=True, exist_ok=True)
    has_val = data.val is not None
    if not has_val:
        report(
            f"note: {data.path} has no val split; training anyway and keeping as best.pt "
            f"the epoch with the lowest train loss"
        )

    run = (
        resumed_run(last, data, settings, device)
        if settings.resume
        else new_run(data, settings, device)
    )
    run.replay = checkpoint.replay_entry(*replay_set(data, settings.seed))
    state = None
    measured = bool(run.history["epoch"])  # false only for a fresh run
    if run.epoch >= settings.epochs and measured:
        report(
            f"{last}: already trained for {run.epoch} epochs (--epochs {settings.epochs}); "
            f"nothing to do"
        )

    def finish(epoch: int, train_scores: list, val_scores: list, seconds: float) -> None:
        nonlocal state
        (train_head,), (val_head,) = train_scores, val_scores
        if epoch > 0 and not math.isfinite(train_head.loss):
            raise UserError(
                f"epoch {epoch}: the train loss is {train_head.loss}; lower --lr "
                f"(the last good epoch is in {last})"
            )
        is_best = record(run, epoch, train_head, val_head, seconds, has_val)
        report(epoch_line(epoch, settings.epochs, train_head, val_head, seconds))
        state = save(run, data, settings, save_dir, has_val, is_best)

    loop.run_epochs(
        run.epoch,
        measured,
        data.train,
        data.val,
        settings,
        device,
        lambda bar: [train_epoch(run, data.train, settings, bar)],
        lambda split: [validate(run, split)],
        finish,
    )
    if state is None:
        state = to_checkpoint(run, data, settings, has_val)
    try:
        history.write_plots(state.history, save_dir)
    except OSError as error:
        raise UserError(
            f"{save_dir}: cannot write the plots ({error.strerror or first_line(error)}); "
            f"the checkpoints of all {run.epoch} epochs are saved"
        ) from None
    return state
