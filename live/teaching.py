"""Teaching a class on the spot: new rows of the head, learnt against the fixed old ones.

A taught class is a name, the backbone features of the images it was shown (at most
`teach_max`, the oldest dropped first) and those images' crops. Every change refits all the
taught rows from zero (`fit_taught_rows`): Adam on the cross-entropy over all classes, the
trained head's rows held fixed, on the taught examples together with the checkpoint's replay set
(a few train features of each old class, which `head.train` stores). The new rows so learn what
sets their examples apart from the old classes, not only where their examples lie: on the demo
data this beat nearest class mean on the taught classes and kept the old ones within 4 points
(docs/live.md, benchmarks/teach.py).

A checkpoint without a replay set (written before it existed, or ImageNet's own classifier)
teaches against the taught classes only, with a stronger weight decay; the old classes then lose
more (measured in docs/live.md). Refitting from zero each time makes the head a function of
what is held, so forgetting the last taught class gives back the trained head itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from extract.atomic import atomic_write
from extract.errors import UserError
from head import checkpoint
from head.adam import Adam
from head.features import REPLAY_PER_CLASS, standardization

STEPS = 100  # full-batch Adam steps of a refit: 0.1 s for 50 examples on a 2-core CPU
LR = 0.01
WEIGHT_DECAY = 0.03  # in standardised units; 0.003 let the old classes lose 12 points
WEIGHT_DECAY_WITHOUT_REPLAY = 10.0  # the old classes lost 22 points at 1, 9 at 10
# A folder name on every system: no / \ or :, no space or dot at either end.
NAME = re.compile(r"\w(?:[\w .'-]*[\w'-])?")
TEACH_MAX = 50  # examples kept per taught class, the oldest dropped
MAX_NAME_LENGTH = 40  # characters of a taught class's name
CROPS = "crops"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch's CPU operations on one thread inside the block (see `fit_taught_rows`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_class_name(name: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """`name` if it can name a taught class (and its crops folder), else UserError saying why."""
    if not isinstance(name, str):
        raise UserError(f"class name {name!r}: must be text")
    if not 1 <= len(name) <= max_length:
        raise UserError(f"class name {name[:60]!r}: must be 1 to {max_length} characters long")
    if not NAME.fullmatch(name):
        raise UserError(
            f"class name {name!r}: only letters, digits, spaces and _ - . ' are allowed, "
            f"starting with a letter or digit and not ending with a space or a dot"
        )
    return name


def fit_taught_rows(
    old_weight: torch.Tensor,
    old_bias: torch.Tensor,
    replay_features: torch.Tensor,
    replay_labels: torch.Tensor,
    taught_features: torch.Tensor,
    taught_labels: torch.Tensor,
    num_taught: int,
    replay_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (weight (k, D), bias (k,)) of `num_taught` new classes on raw features.

    Adam from zero on the mean cross-entropy over the old and new classes of the taught
    examples (labels 0..k-1) and the replay examples (labels of the old classes), only the new
    rows moving; in features standardised over those examples, as head.train's --standardize,
    and folded back. The old rows' logits do not change (standardising the features and
    unfolding the rows cancel out): computed once, or given for the replay set as
    `replay_logits`, a step is two (N x D x k) products. Run on one thread: the products are
    small, and on a busy 2-core CPU waiting for a second thread made a refit of 50 examples
    take 0.4 to 4 s instead of 0.1 s.
    """
    with one_thread():
        features = torch.cat([replay_features, taught_features]).float()
        labels = torch.cat([replay_labels, taught_labels + len(old_weight)])
        if replay_logits is None:
            replay_logits = replay_features @ old_weight.T + old_bias
        old_logits = torch.cat([replay_logits, taught_features @ old_weight.T + old_bias])
        mean, std = standardization([features])
        return fitted_rows(old_logits, (features - mean) / std, labels, mean, std, num_taught)


def fitted_rows(
    old_logits: torch.Tensor,
    standard: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_taught: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_taught_rows`' Adam steps on standardised features; the rows on raw features."""
    old_classes = old_logits.shape[1]
    target = nn.functional.one_hot(labels, old_classes + num_taught).float()
    weight = nn.Parameter(torch.zeros(num_taught, standard.shape[1]))
    bias = nn.Parameter(torch.zeros(num_taught))
    has_replay = bool((labels < old_classes).any())
    decay = WEIGHT_DECAY if has_replay else WEIGHT_DECAY_WITHOUT_REPLAY
    optimizer = Adam([weight, bias], lr=LR, weight_decay=decay)
    for _ in range(STEPS):
        logits = torch.cat([old_logits, standard @ weight.detach().T + bias.detach()], dim=1)
        gradient = (torch.softmax(logits, dim=1) - target)[:, old_classes:] / len(labels)
        weight.grad = gradient.T @ standard
        bias.grad = gradient.sum(0)
        optimizer.step()
    raw = weight.detach() / std
    return raw, bias.detach() - raw @ mean


@dataclasses.dataclass
class Lesson:
    """One taught class: its examples' features and crops, oldest first."""

    features: collections.deque  # (D,) float32 tensors
    crops: collections.deque  # (3, crop, crop) uint8 tensors


@dataclasses.dataclass
class Lessons:
    """The trained head (fixed), its replay set, and the classes taught on top of it."""

    weight: torch.Tensor  # (C, D) float32: the trained head's rows
    bias: torch.Tensor
    wnids: list[str]
    names: list[str]
    provenance: dict[str, str]  # of the backbone, as the checkpoint's `features`
    replay_features: torch.Tensor  # (R, D) float32; R = 0 without a replay set
    replay_labels: torch.Tensor  # (R,) int64
    teach_max: int = TEACH_MAX
    max_name_length: int = MAX_NAME_LENGTH
    taught: dict[str, Lesson] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for field in ("teach_max", "max_name_length"):
            if getattr(self, field) < 1:
                raise UserError(f"{field}={getattr(self, field)}: must be >= 1")

    def valid_name(self, name: object) -> str:
        """`name` if it is a valid class name here (`check_class_name` up to max_name_length),
        else UserError; whether it is taught or trained is not asked."""
        return check_class_name(name, self.max_name_length)

    def check_name(self, name: str) -> None:
        """UserError unless `name` can name a taught class: valid, and not a trained class."""
        self.valid_name(name)
        if name in self.wnids or name in self.names:
            raise UserError(
                f"class name {name!r}: already a class of the trained head; pick another name"
            )

    def add(self, name: str, features: torch.Tensor, crops: torch.Tensor) -> int:
        """Keep the examples (the oldest dropped beyond teach_max); returns how many `name` has."""
        self.check_name(name)
        lesson = self.taught.setdefault(
            name,
            Lesson(
                collections.deque(maxlen=self.teach_max), collections.deque(maxlen=self.teach_max)
            ),
        )
        lesson.features.extend(features.float().cpu())
        lesson.crops.extend(crops.cpu())
        return len(lesson.features)

    def remove(self, name: str) -> None:
        if name not in self.taught:
            known = ", ".join(map(repr, self.taught)) or "none"
            raise UserError(f"class {name!r}: not a taught class (taught: {known})")
        del self.taught[name]

    def in_order(self) -> dict[str, Lesson]:
        """The taught classes sorted by name, the order `extract` gives their crops' folders, so
        that a head taught from scratch and saved goes with the crops' feature file."""
        return dict(sorted(self.taught.items()))

    @property
    def all_wnids(self) -> list[str]:
        return [*self.wnids, *self.in_order()]

    @property
    def all_names(self) -> list[str]:
        return [*self.names, *self.in_order()]

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole head on raw features: the trained rows, then a fitted row per taught class."""
        if not self.taught:
            return self.weight, self.bias
        taught_features = torch.stack(
            [row for lesson in self.in_order().values() for row in lesson.features]
        )
        taught_labels = torch.cat(
            [
                torch.full((len(lesson.features),), index)
                for index, lesson in enumerate(self.in_order().values())
            ]
        )
        weight, bias = fit_taught_rows(
            self.weight,
            self.bias,
            self.replay_features,
            self.replay_labels,
            taught_features,
            taught_labels,
            len(self.taught),
            self.replay_logits,
        )
        return torch.cat([self.weight, weight]), torch.cat([self.bias, bias])

    @functools.cached_property
    def replay_logits(self) -> torch.Tensor:
        """The trained head's logits of the replay set, the same at every refit."""
        with one_thread():
            return self.replay_features @ self.weight.T + self.bias

    def checkpoint(self) -> checkpoint.Checkpoint:
        """A checkpoint of the whole head, with a replay set holding the newest examples of
        each taught class too, so that teaching can go on from it."""
        weight, bias = self.head()
        taught = [
            (index, row)
            for index, lesson in enumerate(self.in_order().values(), start=len(self.wnids))
            for row in list(lesson.features)[-REPLAY_PER_CLASS:]
        ]
        replay_features = torch.cat(
            [self.replay_features, torch.stack([row for _, row in taught])]
            if taught
            else [self.replay_features]
        )
        replay_labels = torch.cat(
            [self.replay_labels, torch.tensor([index for index, _ in taught], dtype=torch.long)]
        )
        return checkpoint.Checkpoint(
            weight=weight.clone(),
            bias=bias.clone(),
            wnids=self.all_wnids,
            class_names=dict(zip(self.all_wnids, self.all_names)),
            provenance=dict(self.provenance),
            replay=checkpoint.replay_entry(replay_features, replay_labels),
        )

    def write_crops(self, folder: Path) -> None:
        """folder/<class>/NNNN.png per taught class, oldest first, as `extract --data` reads
        them; numbered files left there by a save that held more examples are removed."""
        for name, lesson in self.taught.items():
            classdir = folder / name
            classdir.mkdir(parents=True, exist_ok=True)
            for number, crop in enumerate(lesson.crops):
                with atomic_write(classdir / f"{number:04d}.png") as temporary:
                    Image.fromarray(np.ascontiguousarray(crop.permute(1, 2, 0).numpy())).save(
                        temporary, format="PNG"
                    )
            for stale in classdir.glob("[0-9][0-9][0-9][0-9].png"):
                if int(stale.stem) >= len(lesson.crops):
                    stale.unlink()
