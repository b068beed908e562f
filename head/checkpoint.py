"""The checkpoint: what `head.train` writes and `head.evaluate` and `live` read.

A checkpoint is a dict with the keys users of PyTorch's ImageNet example know (`epoch`,
`best_accuracy`, `state_dict`, `optimizer`), the per-epoch history lists, the class list, and
`features`: the provenance of the feature file it was trained on (backbone, node, weights,
weights_sha256, preprocess), so the exact backbone can be rebuilt. Optionally `replay`: a few
train features of each class in float16 (`replay_entry`), so that `live` can teach a new class
against the old ones without the feature file. `check_compatible` is the one
place that decides whether a checkpoint goes with a feature file. Everything in it is a tensor,
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
REPLAY = "replay"


def save_atomic(state: dict, path: Path) -> None:
    """Save so that a crash at any moment leaves either the previous file or the new one."""
    with atomic_write(path) as temporary, open(temporary, "wb") as stream:
        torch.save(state, stream)  # through Python's file: a full disk is an OSError (ENOSPC)


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


def check_compatible(
    state: dict,
    origin: str,
    features_path: Path,
    provenance: dict[str, str],
    wnids: list[str],
    feature_dim: int,
) -> None:
    """Refuse a checkpoint trained on other classes, or on features made another way (another
    backbone, node, weights or preprocessing) or of another width, than those of the file."""
    trained_wnids = list(state["numeric_class_names"])
    if trained_wnids != list(wnids):
        raise UserError(
            f"{origin}: trained on {len(trained_wnids)} classes that differ from the "
            f"{len(wnids)} of {features_path}"
        )
    recorded = dict(state["features"])
    if recorded != provenance:
        differ = "; ".join(
            f"{key} {str(recorded.get(key))[:40]!r} in the checkpoint, "
            f"{str(provenance.get(key))[:40]!r} in the file"
            for key in provenance
            if recorded.get(key) != provenance[key]
        )
        raise UserError(
            f"{origin}: trained on features made differently from {features_path} ({differ})"
        )
    layer = state["state_dict"]
    weight = layer.get("weight") if isinstance(layer, dict) else None
    if isinstance(weight, torch.Tensor) and (weight.ndim != 2 or weight.shape[1] != feature_dim):
        raise UserError(
            f"{origin}: the head takes {tuple(weight.shape)[1:]} features, "
            f"{features_path} holds {feature_dim} per image"
        )


def replay_entry(features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `replay` value: features (N, D) stored as float16 (2 D bytes a row) and their labels."""
    return {"features": features.detach().cpu().half(), "labels": labels.detach().cpu().long()}


def read_replay(
    state: dict, origin: str, num_classes: int, feature_dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The replay set's float32 features and labels, or None for a checkpoint without one
    (written before it existed); refused when it does not fit the head's classes and width."""
    replay = state.get(REPLAY)
    if replay is None:
        return None
    features = replay.get("features") if isinstance(replay, dict) else None
    labels = replay.get("labels") if isinstance(replay, dict) else None
    if not (
        isinstance(features, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and features.is_floating_point()
        and features.ndim == 2
        and features.shape[1] == feature_dim
        and labels.shape == features.shape[:1]
        and not labels.is_floating_point()
        and bool(((labels >= 0) & (labels < num_classes)).all())
        and bool(features.isfinite().all())
    ):
        raise UserError(
            f"{origin}: '{REPLAY}' must hold finite features (N, {feature_dim}) and N labels "
            f"in 0..{num_classes - 1}"
        )
    return features.float(), labels.long()
