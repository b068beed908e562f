"""head from Python: `fit` does what `python -m head.train` does, `report` what
`python -m head.evaluate` computes.

The commands parse their arguments and call these. Expected problems raise
`extract.errors.UserError` with the line the command prints; nothing here prints except progress
(a tqdm bar per epoch and one line per epoch), which ``progress=False`` turns off.

Training, scikit-learn and matplotlib are imported when a function is called: `live` reads
`head`'s checkpoint module and should not load them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from extract.errors import UserError


def fit(
    features: str | os.PathLike,
    save: str | os.PathLike,
    *,
    device: str = "auto",
    stream: bool | None = None,
    max_memory: int | str | None = None,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> dict:
    """Train the new classification layer on the feature file `features`, saving into `save`.

    `settings` are those of ``python -m head.train``, spelled with underscores and with the same
    defaults: ``epochs`` (50), ``batch_size`` (100), ``lr`` (0.001), ``weight_decay`` (0),
    ``seed`` (0), ``init`` ("random", or "classifier": the backbone's ImageNet classifier rows;
    "fc8" for AlexNet), ``standardize``, ``flip``, ``precision``
    ("fp32" or "bf16"), ``resume``, ``overwrite`` and ``progress`` (True). `device` is
    "auto", "cpu" or "cuda"; `stream` True reads the features from the file in blocks, False
    loads them, None (the default) streams only when they do not fit in `max_memory` (bytes or
    a size such as "2GB") and the memory available.

    `log` receives the memory estimate and one line per epoch, as the command prints them; by
    default they are printed when ``progress`` is on, and notes (what was not done as asked,
    such as ``flip`` on a file without flipped features) are issued as warnings.

    Returns the final checkpoint's contents (``last.pt``): ``epoch``, ``best_accuracy``,
    ``best_epoch``, ``state_dict``, the per-epoch history lists, the classes and the features'
    provenance. Writes last.pt, best.pt, history.csv and the plots into `save`.
    """
    from extract.device import resolve_device
    from head import features as feature_sets
    from head.training import check_save_dir, train

    chosen = checked_settings(settings)
    if chosen.lr <= 0 or chosen.weight_decay < 0:
        raise UserError("--batch-size must be >= 1, --lr > 0 and --weight-decay >= 0")
    max_memory = parsed_size(max_memory)
    log = log or progress_lines(chosen.progress)
    save = Path(save)
    resolved = resolve_device(device)
    check_save_dir(save, chosen)
    data = feature_sets.load(
        Path(features),
        flip=chosen.flip,
        device=resolved,
        report=log,
        stream=stream,
        max_memory=max_memory,
    )
    return train(data, save, chosen, resolved, report=log).to_dict()


def checked_settings(settings: dict[str, Any]):
    """`settings` as `training.Settings`, after the checks both commands make."""
    from extract.precisions import HEAD_CHOICES, checked
    from head.training import INITS, PRETRAINED_INITS, Settings

    known = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = Settings(**settings)
    if chosen.init not in INITS:
        raise UserError(f"--init {chosen.init}: choose from {', '.join(INITS)}")
    checked(chosen.precision, HEAD_CHOICES)
    if chosen.batch_size < 1:
        raise UserError("--batch-size must be >= 1, --lr > 0 and --weight-decay >= 0")
    if chosen.epochs < (0 if chosen.init in PRETRAINED_INITS else 1):
        raise UserError(
            "--epochs must be >= 1 (0 is allowed with --init classifier or fc8: measure only)"
        )
    if chosen.resume and chosen.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    return chosen


def parsed_size(max_memory: int | str | None) -> int | None:
    from head import features as feature_sets

    if isinstance(max_memory, str):
        try:
            return feature_sets.parse_size(max_memory)
        except ValueError as error:
            raise UserError(f"--max-memory {max_memory}: {error}") from None
    return max_memory


def sweep(
    features: str | os.PathLike,
    save: str | os.PathLike,
    *,
    lr: str | Sequence[float] = "1e-4,3e-4,1e-3,3e-3,1e-2",
    weight_decay: str | Sequence[float] = "0,1e-5,1e-4,1e-3",
    standardize: str | bool = "both",
    knn: str | Sequence[int] | None = None,
    ridge: bool = False,
    holdout: float | None = None,
    save_all: bool = False,
    device: str = "auto",
    stream: bool | None = None,
    max_memory: int | str | None = None,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> list[dict]:
    """Train a grid of heads at once on the feature file `features` and save the best in `save`,
    as ``python -m head.sweep`` does.

    The grid is every `lr` x `weight_decay` x `standardize` ("on", "off" or "both"), each a
    comma list or a sequence (40 heads by default); all heads see the same batches in the same
    order and each ends with the weights ``fit`` gives with its settings. `knn` (k values, such
    as "10,20,100,200") and `ridge` add the zero-training baselines to the report. `holdout`
    (in (0, 0.5]) selects on that seeded fraction of train instead of on val, and trains the
    winner again on all of train. `save_all` keeps each head's best.pt under ``save/heads``.
    `settings` are the other settings of ``fit`` (``epochs``, ``batch_size``, ``seed``,
    ``init``, ``flip``, ``precision``, ``resume``, ``overwrite``, ``progress``) with its
    defaults; `device`, `stream`, `max_memory` and `log` are as in ``fit``.

    Returns one dict per head and baseline (the columns of sweep.csv: ``method``, ``lr``,
    ``weight_decay``, ``standardize``, ``best_epoch``, ``val_top1``, ``val_top5``,
    ``val_loss``, ``train_top1``, ``seconds``, ``note``), the winner's with ``best`` True.
    Writes best.pt, sweep.csv, sweep.png and sweep.pt (the state ``resume`` continues).
    """
    from extract.device import resolve_device
    from head import grid, selection

    for fixed in ("lr", "weight_decay", "standardize"):
        settings.pop(fixed, None)
    chosen = checked_settings(settings)
    cells = grid.cells(lr, weight_decay, standardize)
    grid.check_holdout(holdout)
    plan = selection.Plan(
        cells=cells,
        settings=chosen,
        holdout=holdout,
        knn=grid.knn_values(knn),
        ridge=ridge,
        save_all=save_all,
    )
    return selection.run(
        Path(features),
        Path(save),
        plan,
        resolve_device(device),
        stream,
        parsed_size(max_memory),
        log or progress_lines(chosen.progress),
    )


def progress_lines(progress: bool) -> Callable[[str], None]:
    """Training's lines for a caller in Python: progress printed (when on), notes as warnings."""

    def show(line: str) -> None:
        if line.startswith("note: "):
            warnings.warn(line.removeprefix("note: "), UserWarning, stacklevel=4)
        elif progress:
            print(line)

    return show


def report(
    model: str | os.PathLike,
    features: str | os.PathLike,
    split: str = "val",
    out: str | os.PathLike | None = None,
) -> dict:
    """Measure a trained head (a checkpoint, or the folder `fit` saved into: its best.pt) on
    one split of a feature file, as ``python -m head.evaluate`` does.

    Returns what report.json holds: ``top1``, ``top5``, ``mean_per_class_accuracy`` (percent),
    ``expected_calibration_error``, ``images``, ``k``, the files, the split, the checkpoint's
    ``epoch`` and ``best_accuracy``, and ``unlabelled_skipped``. With `out`, also writes
    per_class.csv, confusion.png and report.json there.
    """
    from head import evaluation  # scikit-learn and matplotlib

    return evaluation.evaluate(
        Path(model), Path(features), split, None if out is None else Path(out)
    )
