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

from extract.device import DEFAULT_DEVICE
from extract.errors import Option, UserError, contradiction
from head.checkpoint import BEST, LAST, Checkpoint
from head.grid import DEFAULT_LRS, DEFAULT_STANDARDIZE, DEFAULT_WEIGHT_DECAYS
from head.settings import INITS, PRETRAINED_INITS, Settings


def fit(
    features: str | os.PathLike,
    save: str | os.PathLike,
    *,
    epochs: int = Settings.epochs,
    batch_size: int = Settings.batch_size,
    lr: float = Settings.lr,
    weight_decay: float = Settings.weight_decay,
    seed: int = Settings.seed,
    init: str = Settings.init,
    standardize: bool = Settings.standardize,
    flip: bool = Settings.flip,
    precision: str = Settings.precision,
    cuda_graphs: bool = Settings.cuda_graphs,
    resume: bool = Settings.resume,
    overwrite: bool = Settings.overwrite,
    progress: bool = Settings.progress,
    device: str = DEFAULT_DEVICE,
    stream: bool | None = None,
    max_memory: int | str | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train the new classification layer on the feature file `features`, saving into `save`.

    The keywords are the options of ``python -m head.train``, spelled with underscores and with
    the same defaults (both read `head.settings.Settings`): `epochs`, `batch_size`, `lr`,
    `weight_decay`, `seed`, `init` ("random", or "classifier": the backbone's ImageNet
    classifier rows; "fc8" for AlexNet), `standardize`, `flip`, `precision` ("fp32" or "bf16"),
    `cuda_graphs` (replay the epochs from CUDA graphs where possible; same results), `resume`,
    `overwrite` and `progress`. `device` is "auto", "cpu" or "cuda"; `stream` True reads the
    features from the file in blocks, False loads them, None (the default) streams only when
    they do not fit in `max_memory` (bytes or a size such as "2GB") and the memory available.

    `log` receives the memory estimate and one line per epoch, as the command prints them; by
    default they are printed when `progress` is on, and notes (what was not done as asked,
    such as `flip` on a file without flipped features) are issued as warnings.

    Returns a `FitResult`: the best epoch and its top-1, the files written (last.pt, best.pt,
    history.csv and the plots, in `save`) and the per-epoch history; the final checkpoint
    (`head.checkpoint.Checkpoint`, optimizer state included) is its ``checkpoint``.
    """
    from extract.device import resolve_device
    from head import features as feature_sets
    from head.training import check_save_dir, train

    chosen = checked_settings(
        Settings(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            init=init,
            standardize=standardize,
            flip=flip,
            precision=precision,
            cuda_graphs=cuda_graphs,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
    )
    max_memory = parsed_size(max_memory)
    log = log or progress_lines(chosen.progress)
    save = Path(save)
    resolved = resolve_device(device)
    check_save_dir(save, LAST, "run", chosen)
    data = feature_sets.load(
        Path(features),
        flip=chosen.flip,
        device=resolved,
        report=log,
        stream=stream,
        max_memory=max_memory,
    )
    return FitResult.of(train(data, save, chosen, resolved, report=log), save)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What `fit` trained, small enough to print in a notebook: the best epoch and its top-1,
    where the run was saved, and the history. The whole last checkpoint is `checkpoint`."""

    best_epoch: int
    best_top1: float  # percent
    best_by: str  # "validation top-1", or "train loss" without a val split
    epochs: int
    save: Path  # the folder: best.pt, last.pt, history.csv and the plots
    history: dict[str, list]  # per epoch: epoch, train_loss, train_top1, val_loss, val_top1, ...
    checkpoint: Checkpoint = dataclasses.field(repr=False)

    @classmethod
    def of(cls, last: Checkpoint, save: Path) -> FitResult:
        return cls(
            best_epoch=last.best_epoch,
            best_top1=last.best_top1,
            best_by=last.best_by,
            epochs=last.epoch,
            save=save,
            history=last.history,
            checkpoint=last,
        )

    @property
    def best(self) -> Path:
        return self.save / BEST

    @property
    def last(self) -> Path:
        return self.save / LAST

    def __repr__(self) -> str:
        return (
            f"FitResult(best_epoch={self.best_epoch}, best_top1={self.best_top1:.2f} "
            f"({self.best_by}), epochs={self.epochs}, best={str(self.best)!r}, "
            f"last={str(self.last)!r}, history=<{len(self.history['epoch'])} epochs>)"
        )


def checked_settings(chosen: Settings) -> Settings:
    """`chosen` after the checks `fit` and `sweep` (and so both commands) make, in the caller's
    words: keywords from Python, flags from a command."""
    from extract.precisions import HEAD_CHOICES, checked

    if chosen.init not in INITS:
        raise UserError(Option("init", chosen.init), f": choose from {', '.join(INITS)}")
    checked(chosen.precision, HEAD_CHOICES)
    if chosen.batch_size < 1 or chosen.lr <= 0 or chosen.weight_decay < 0:
        raise UserError(
            Option("batch_size"),
            " must be >= 1, ",
            Option("lr"),
            " > 0 and ",
            Option("weight_decay"),
            " >= 0",
        )
    if chosen.epochs < (0 if chosen.init in PRETRAINED_INITS else 1):
        raise UserError(
            Option("epochs"),
            " must be >= 1 (0 is allowed with ",
            Option("init", "classifier"),
            " or fc8: measure only)",
        )
    if chosen.resume and chosen.overwrite:
        raise contradiction()
    return chosen


def parsed_size(max_memory: int | str | None) -> int | None:
    """`max_memory` in bytes: a number, or a size such as "2GB"."""
    from head import features as feature_sets

    if isinstance(max_memory, str):
        try:
            return feature_sets.parse_size(max_memory)
        except ValueError as error:
            raise UserError(Option("max_memory", max_memory), f": {error}") from None
    return max_memory


def sweep(
    features: str | os.PathLike,
    save: str | os.PathLike,
    *,
    lr: str | Sequence[float] = DEFAULT_LRS,
    weight_decay: str | Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    standardize: str | bool = DEFAULT_STANDARDIZE,
    knn: str | Sequence[int] | None = None,
    ridge: bool = False,
    holdout: float | None = None,
    save_all: bool = False,
    epochs: int = Settings.epochs,
    batch_size: int = Settings.batch_size,
    seed: int = Settings.seed,
    init: str = Settings.init,
    flip: bool = Settings.flip,
    precision: str = Settings.precision,
    resume: bool = Settings.resume,
    overwrite: bool = Settings.overwrite,
    progress: bool = Settings.progress,
    device: str = DEFAULT_DEVICE,
    stream: bool | None = None,
    max_memory: int | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train a grid of heads at once on the feature file `features` and save the best in `save`,
    as ``python -m head.sweep`` does.

    The grid is every `lr` x `weight_decay` x `standardize` ("on", "off" or "both"), each a
    comma list or a sequence (40 heads by default); all heads see the same batches in the same
    order and each ends with the weights ``fit`` gives with its settings. `knn` (k values, such
    as "10,20,100,200") and `ridge` add the zero-training baselines to the report. `holdout`
    (in (0, 0.5]) selects on that seeded fraction of train instead of on val, and trains the
    winner again on all of train. `save_all` keeps each head's best.pt under ``save/heads``.
    The other keywords mean what they mean in ``fit``, with its defaults.

    Returns one dict per head and baseline (the columns of sweep.csv: ``method``, ``lr``,
    ``weight_decay``, ``standardize``, ``best_epoch``, ``val_top1``, ``val_top5``,
    ``val_loss``, ``train_top1``, ``seconds``, ``note``), the winner's with ``best`` True.
    Writes best.pt, sweep.csv, sweep.png and sweep.pt (the state ``resume`` continues).
    """
    from extract.device import resolve_device
    from head import grid, selection

    chosen = checked_settings(
        Settings(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            init=init,
            flip=flip,
            precision=precision,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
    )
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
        if line.startswith(("note: ", "warning: ")):
            message = line.removeprefix("note: ").removeprefix("warning: ")
            warnings.warn(message, UserWarning, stacklevel=4)
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
    ``epoch`` and ``best_accuracy``, and ``unlabelled_skipped``. Like the command, it writes
    per_class.csv, confusion.png and report.json into `out`, by default the model's folder
    (`reports_folder`).
    """
    from head import evaluation  # scikit-learn and matplotlib

    model = Path(model)
    out = reports_folder(model) if out is None else Path(out)
    return evaluation.evaluate(model, Path(features), split, out)


def reports_folder(model: Path) -> Path:
    """Where a head's reports go by default: its folder, or the folder holding the checkpoint."""
    return model if model.is_dir() else model.parent
