"""The head's training settings: the one place their defaults are written.

``python -m head.train`` takes its flags' defaults from `Settings`, and `head.fit` its keywords'
defaults, so the command and the Python API cannot drift apart. Light to import: training is
not loaded with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

INITS = ("random", "classifier", "fc8")  # fc8: AlexNet's name for its classifier
PRETRAINED_INITS = ("classifier", "fc8")
# Settings a resumed run must share with the run it continues (--epochs may grow).
SAME_ON_RESUME = (
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "init",
    "standardize",
    "flip",
    "precision",
)


@dataclasses.dataclass
class Settings:
    """The hyper-parameters; the defaults are the seed's recipe."""

    epochs: int = 50
    batch_size: int = 100
    lr: float = 0.001
    weight_decay: float = 0.0
    seed: int = 0
    init: str = "random"
    standardize: bool = False
    flip: bool = False
    precision: str = "fp32"  # of the training matmuls; the weights and Adam stay float32
    cuda_graphs: bool = True  # replay the steps from CUDA graphs where possible (same results)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def recorded(self) -> dict:
        return {key: getattr(self, key) for key in ("epochs", *SAME_ON_RESUME)}


def changed_settings(saved: dict, settings: Settings, skip: Collection[str] = ()) -> list[str]:
    """What a resume would change of `SAME_ON_RESUME` (but `skip`), one line per setting in
    the command's words: ``--lr 0.001 -> 0.01``. `saved` is the settings recorded in the file;
    a setting added after it was written takes its default."""
    saved = {**Settings().recorded(), **saved}
    return [
        f"--{key.replace('_', '-')} {saved[key]} -> {getattr(settings, key)}"
        for key in SAME_ON_RESUME
        if key not in skip and saved[key] != getattr(settings, key)
    ]
