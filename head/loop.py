"""The epoch loop, for one head or a grid of them: an ordinary run is the grid of one head.

`training.train` trains one head and `sweeping.sweep_heads` a grid of K heads as one wide layer,
and they walk the epochs alike, so they share this loop rather than keep a copy each: an
optional epoch 0 that only measures the starting layer (ImageNet's own classifier rows), then
per epoch one pass over the train split in the generator's order (`train_pass`), every head
scored on the selection split, the time taken, and the epoch handed back to be recorded and
saved. Everything here speaks of per-head lists of scores; for `training.train` the list holds
one head (K = 1). What differs stays with the caller: what a step updates, and what an epoch
writes (``best.pt`` and ``last.pt``, or ``sweep.pt``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from head.features import SplitTensors, StreamedSplit
from head.scoring import Scores
from head.settings import PRETRAINED_INITS, Settings
from head.step import memory_batches, stream_batches

Split = SplitTensors | StreamedSplit
# One step of every head on a batch: (features, labels, bf16, loss sums (K,), hits (K,)).
Step = Callable[[torch.Tensor, torch.Tensor, bool, torch.Tensor, torch.Tensor], None]
# Every head's exported layer scored on a split (NaN scores for None).
Evaluate = Callable[[Split | None], list[Scores]]
# Record, report and save an epoch: (epoch, train scores, selection scores, seconds).
Finish = Callable[[int, list[Scores], list[Scores], float], None]


def train_pass(
    train: Split,
    settings: Settings,
    generator: torch.Generator,
    device: torch.device,
    heads: int,
    step: Step,
    bar: tqdm,
) -> list[Scores]:
    """One pass over the train split in `generator`'s order, every batch given to `step`;
    returns each head's running loss and top-1.

    Loss and hits add up in (K,) tensors on the device and are read once at the end of the
    epoch: a `.item()` per step would wait for the device after every step.
    """
    if isinstance(train, StreamedSplit):
        batches = stream_batches(train, settings.batch_size, generator, device)
    else:
        batches = memory_batches(train, settings.batch_size, generator, settings.flip)
    loss_sums = torch.zeros(heads, dtype=torch.float64, device=device)
    correct = torch.zeros(heads, dtype=torch.int64, device=device)
    bf16 = settings.precision == "bf16"
    for features, labels in batches:
        step(features, labels, bf16, loss_sums, correct)
        bar.update(len(labels))
    count = len(train)
    return [
        Scores(loss=loss / count, top1=100.0 * hits / count, top5=math.nan)
        for loss, hits in zip(loss_sums.tolist(), correct.tolist())
    ]


def run_epochs(
    done: int,
    measured: bool,
    train: Split,
    selection: Split | None,
    settings: Settings,
    device: torch.device,
    one_pass: Callable[[tqdm], list[Scores]],
    evaluate: Evaluate,
    finish: Finish,
) -> None:
    """Epochs ``done + 1`` to ``settings.epochs``, after an epoch 0 when the heads start from
    ImageNet's classifier and nothing is `measured` yet (a fresh run, not a resumed one)."""
    if done == 0 and settings.init in PRETRAINED_INITS and not measured:
        started = time.perf_counter()
        train_scores, selection_scores = evaluate(train), evaluate(selection)
        finish(0, train_scores, selection_scores, time.perf_counter() - started)
    for epoch in range(done + 1, settings.epochs + 1):
        started = time.perf_counter()
        with tqdm(
            total=len(train),
            unit="img",
            desc=f"epoch {epoch}",
            leave=False,
            disable=not settings.progress,
        ) as bar:
            train_scores = one_pass(bar)
        selection_scores = evaluate(selection)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finish(epoch, train_scores, selection_scores, time.perf_counter() - started)
