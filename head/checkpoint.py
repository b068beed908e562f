"""The checkpoint: what `head.train` writes and `head.evaluate` and `live` read.

A checkpoint is a dict with the keys users of PyTorch's ImageNet example know (`epoch`,
`best_accuracy`, `state_dict`, `optimizer`), the per-epoch history lists, the class list, and
`features`: the provenance of the feature file it was trained on (backbone, node, weights,
weights_sha256, preprocess), so the exact backbone can be rebuilt. Everything in it is a tensor,
number, string, list or dict, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from extract.atomic import atomic_write
from extract.errors import UserError, first_line

LAST = "last.pt"
BEST = "best.pt"
KEYS = (
    "epoch",
    "best_accuracy",
    "state_dict",
    "optimizer",
    "train_loss",
    "validation_loss",
    "train_accuracy",
    "validation_accuracy",
    "time",
    "numeric_class_names",
    "tiny_class",
    "features",
)


def save_atomic(state: dict, path: Path) -> None:
    """Save so that a crash at any moment leaves either the previous file or the new one."""
    with atomic_write(path) as temporary:
        torch.save(state, temporary)


def load(path: Path) -> dict:
    """Load a checkpoint safely (no pickled code runs) and check that it is one of ours."""
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise UserError(
                f"{path}: not a loadable checkpoint (damaged, or not a PyTorch file)"
            ) from None
        raise UserError(
            f"{path}: refused, it holds pickled Python objects, not only tensors "
            f"and plain data (loading them could run code)"
        ) from None
    except Exception as error:  # foreign pickles, damaged zips, other formats
        raise UserError(f"{path}: not a loadable checkpoint ({first_line(error)})") from None
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not a head checkpoint (missing {', '.join(missing[:4])})")
    return state
