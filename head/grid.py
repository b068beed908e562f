"""The sweep's grid as data: which heads train together, checked before any work.

A head is one (learning rate, weight decay, standardize) cell. The grid is their product, in the
order the wide layer stores them: the raw heads first, then the standardised ones (each group's
rows contiguous, so each reads its own view of the batch with one matrix product), and within a
group by learning rate, then weight decay. Everything a user can get wrong here (an empty or
duplicated list, a negative rate, a k-NN k beyond the train split, a holdout fraction outside
(0, 0.5], a grid too large for the memory) is refused with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from extract.errors import Option, UserError
from head import adam

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3)
STANDARDIZE = {"off": (False,), "on": (True,), "both": (False, True)}
DEFAULT_STANDARDIZE = "both"
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Cell:
    """The settings one head of the grid trains with; the rest are shared by all heads."""

    lr: float
    weight_decay: float
    standardize: bool

    @property
    def name(self) -> str:
        """A folder name for ``--save-all``: ``lr0.001-wd1e-05-standardized``."""
        view = "standardized" if self.standardize else "raw"
        return f"lr{self.lr:g}-wd{self.weight_decay:g}-{view}"


def parse_list(
    name: str, values: str | float | Sequence[float], minimum: float, strict: bool
) -> tuple[float, ...]:
    """The numbers of a comma list (or a Python number or sequence) given to option `name`.

    Refused: an empty list, a value that is not a finite number, one below `minimum` (or equal
    to it when `strict`), and a value given twice (two identical heads would waste a slot and
    tie in the selection).
    """
    if isinstance(values, str):
        texts = [text.strip() for text in values.split(",")]
        if not values.strip():
            raise UserError(Option(name), ": empty list (give comma-separated values)")
    elif isinstance(values, (int, float)):
        texts = [values]
    else:
        texts = list(values)
        if not texts:
            raise UserError(Option(name), ": empty list (give comma-separated values)")
    numbers = []
    for text in texts:
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise UserError(Option(name), f": {text!r} is not a number") from None
        if not math.isfinite(number):
            raise UserError(Option(name), f": {text!r} is not a finite number")
        if number < minimum or (strict and number == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise UserError(Option(name), f": {text} must be {bound}")
        numbers.append(number)
    repeated = sorted({number for number in numbers if numbers.count(number) > 1})
    if repeated:
        raise UserError(Option(name), f": {', '.join(f'{n:g}' for n in repeated)} given twice")
    return tuple(numbers)


def cells(
    lrs: str | Sequence[float],
    weight_decays: str | Sequence[float],
    standardize: str | bool,
) -> list[Cell]:
    """The grid's heads in the wide layer's order (raw first); each list checked as above."""
    lr_values = parse_list("lr", lrs, 0.0, strict=True)
    decay_values = parse_list("weight_decay", weight_decays, 0.0, strict=False)
    if isinstance(standardize, bool):
        standardize = "on" if standardize else "off"
    if standardize not in STANDARDIZE:
        raise UserError(
            Option("standardize", standardize), f": choose from {', '.join(STANDARDIZE)}"
        )
    return [
        Cell(lr, decay, view)
        for view in STANDARDIZE[standardize]
        for lr in lr_values
        for decay in decay_values
    ]


def knn_values(values: str | Sequence[int] | None) -> tuple[int, ...]:
    """The k of ``--knn`` as whole numbers (`knn.check_ks` checks them against the train split)."""
    if values is None:
        return ()
    numbers = parse_list("knn", values, 0.0, strict=True)
    fractional = [number for number in numbers if number != int(number)]
    if fractional:
        raise UserError(Option("knn"), f": {fractional[0]:g} is not a whole number")
    return tuple(int(number) for number in numbers)


def check_holdout(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 0.5:
        raise UserError(Option("holdout", fraction), ": must be in (0, 0.5]")


def held_rows(count: int, fraction: float) -> int:
    """How many of `count` train rows ``--holdout`` `fraction` sets aside: at least one."""
    return max(1, round(count * fraction))


def holdout_rows(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows trained on, rows selected on), each sorted: a seeded `fraction` of `count` rows.

    Drawn from a generator of its own (seeded with `seed`), so the split is the same on resume
    and the training generator's draws are those of an ordinary run on the remaining rows.
    """
    held = held_rows(count, fraction)
    if held >= count:
        raise UserError(Option("holdout", fraction), f": leaves no train rows of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def check_memory(cell_count: int, classes: int, feature_dim: int, available: int) -> int:
    """Refuse, before any work, a grid whose weights, Adam state and best copies do not fit in
    `available` bytes; returns the bytes it needs.

    `adam.grid_memory_bytes` counts the weight, its gradient and Adam's two moments; the sweep
    also keeps each head's best weights, one copy more.
    """
    needed = sweep_memory_bytes(cell_count, classes, feature_dim)
    if needed > available:
        fits = available // sweep_memory_bytes(1, classes, feature_dim)
        raise UserError(
            Option("lr"),
            " x ",
            Option("weight_decay"),
            " x ",
            Option("standardize"),
            f": {cell_count} heads of {classes} x "
            f"{feature_dim} need {needed / MIB:,.0f} MiB, only {available / MIB:,.0f} MiB is "
            f"available; the largest grid that fits has {fits} heads",
        )
    return needed


def sweep_memory_bytes(heads: int, classes: int, feature_dim: int) -> int:
    trained = adam.grid_memory_bytes(heads, classes, feature_dim)
    return trained + trained // adam.COPIES  # the best copies
