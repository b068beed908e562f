"""The checkpoint: what `head.train` writes and `head.evaluate`, `live` and the benchmarks read.

`Checkpoint` holds a trained head with what it needs to be used again: the layer on raw
features, the classes, the provenance of the feature file it was trained on (backbone, node,
weights, weights_sha256, preprocess, so the exact backbone can be rebuilt), the history, and what
resuming needs. On disk it is a dict with the keys users of PyTorch's ImageNet example know
(`epoch`, `best_accuracy`, `state_dict`, `optimizer`) and the seed's (`numeric_class_names`,
`tiny_class`, `features`); those names appear only in `to_dict` and `from_dict`. Everything in it
is a tensor, number, string, list or dict, so it loads with ``torch.load(..., weights_only=True)``.

`load` is the one place that reads a checkpoint file and refuses one that is not ours (missing,
damaged, pickled code, missing entries, metadata of the wrong type, a layer of the wrong shape);
`save` the one that writes it, atomically. Both go through `load_dict` and `save_dict`, which
the sweep's state file shares. `preprocess_of` parses and checks the recorded
preprocessing for `live` (it needs torchvision, which training does not load).
`check_compatible` decides whether a checkpoint goes with a feature file (`check_trained_on`,
whether any head does).

Optional fields are written only when set and read with a default, so a field added later
leaves older checkpoints loadable. One such is `replay`: a few train features of each class in
float16 with their labels (`replay_entry`), which `head.train` stores so that `live` can teach a
new class against the old ones without the feature file.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from extract.atomic import atomic_write
from extract.errors import UserError, first_line
from extract.provenance import PROVENANCE_KEYS

if TYPE_CHECKING:
    from extract.preprocess import Preprocess

LAST = "last.pt"
BEST = "best.pt"
# `Checkpoint.history`'s lists (one value per epoch) -> their keys in the file.
HISTORY_KEYS = {
    "epoch": "history_epochs",
    "train_loss": "train_loss",
    "train_top1": "train_accuracy",
    "val_loss": "validation_loss",
    "val_top1": "validation_accuracy",
    "val_top5": "validation_top5",
    "seconds": "time",
}


def empty_history() -> dict[str, list]:
    return {name: [] for name in HISTORY_KEYS}


def best_by(has_val: bool) -> str:
    """`Checkpoint.best_by` of a run: what chose its best epoch, the highest validation top-1,
    or without a val split the lowest train loss."""
    return "validation top-1" if has_val else "train loss"


@dataclasses.dataclass
class Checkpoint:
    """A trained head, its classes, where its features came from, and its training state."""

    weight: torch.Tensor  # (C, D) float32, on raw features (any standardisation folded in)
    bias: torch.Tensor  # (C,) float32
    wnids: list[str]  # output i is class wnids[i]
    class_names: dict[str, str]  # wnid -> readable name
    provenance: dict[str, str]  # of the feature file: extract.provenance.PROVENANCE_KEYS
    epoch: int = 0  # epochs trained
    best_top1: float = 0.0  # percent, of the epoch selected as best (see `best_by`)
    history: dict[str, list] = dataclasses.field(default_factory=empty_history)
    optimizer_state: dict = dataclasses.field(default_factory=dict)
    best_epoch: int | None = None
    best_by: str | None = None  # `best_by(has_val)`, or how a sweep selected
    settings: dict | None = None  # the hyper-parameters that produced the head
    generator_state: torch.Tensor | None = None  # the shuffling's, for an exact resume
    trained_layer: dict[str, torch.Tensor] | None = None  # weight, bias as trained
    standardization: dict[str, torch.Tensor] | None = None  # mean, std of the train features
    # How this head was chosen among others: None for one `head.train` run; a sweep records
    # its grid and the winning settings here.
    selected_from: dict | None = None
    # A few train features of each class, float16 (N, D), and their labels (N,): what `live`
    # teaches new classes against (`replay_entry`, `replay_rows`).
    replay: dict[str, torch.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        """Readable class names in output order (the wnid where none is recorded)."""
        return [self.class_names.get(wnid, wnid) for wnid in self.wnids]

    @property
    def layer(self) -> dict[str, torch.Tensor]:
        """The layer as a `nn.Linear` state_dict."""
        return {"weight": self.weight, "bias": self.bias}

    def to_dict(self) -> dict:
        """The dict saved on disk, under the seed's keys."""
        state = {
            "epoch": self.epoch,
            "best_accuracy": self.best_top1,
            "state_dict": {"weight": self.weight, "bias": self.bias},
            "optimizer": self.optimizer_state,
            **{key: list(self.history[name]) for name, key in HISTORY_KEYS.items()},
            "numeric_class_names": list(self.wnids),
            "tiny_class": dict(self.class_names),
            "features": dict(self.provenance),
        }
        optional = {
            "best_epoch": self.best_epoch,
            "selection": self.best_by,
            "args": self.settings,
            "generator": self.generator_state,
            "trainable": self.trained_layer,
        }
        state.update({key: value for key, value in optional.items() if value is not None})
        if self.trained_layer is not None:  # written, None included, by every training run
            state["standardization"] = self.standardization
        if self.selected_from is not None:
            state["selected_from"] = self.selected_from
        if self.replay is not None:
            state["replay"] = self.replay
        return state

    @classmethod
    def from_dict(cls, state: object, origin: str) -> Checkpoint:
        """The checkpoint in a loaded dict, checked for every entry `live` and `head` rely on;
        anything else is refused with one line naming `origin`."""
        required = (
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
        missing = [key for key in required if not isinstance(state, dict) or key not in state]
        if missing:
            raise UserError(f"{origin}: not a head checkpoint (missing {', '.join(missing[:4])})")
        provenance = state["features"]
        if not isinstance(provenance, dict) or not all(
            isinstance(provenance.get(key), str) for key in PROVENANCE_KEYS
        ):
            raise UserError(
                f"{origin}: 'features' must record {', '.join(PROVENANCE_KEYS)} as strings"
            )
        wnids, names = state["numeric_class_names"], state["tiny_class"]
        if not (
            isinstance(wnids, list)
            and all(isinstance(wnid, str) for wnid in wnids)
            and isinstance(names, dict)
            and all(isinstance(name, str) for name in names.values())
        ):
            raise UserError(f"{origin}: class names must be a list of wnids and a dict of names")
        weight, bias = checked_layer(state["state_dict"], origin)
        if weight.shape[0] != len(wnids):
            raise UserError(
                f"{origin}: the head has {weight.shape[0]} outputs but the checkpoint "
                f"names {len(wnids)} classes"
            )
        history = {
            name: list(state[key] if key in required else state.get(key, []))
            for name, key in HISTORY_KEYS.items()
        }
        return cls(
            weight=weight,
            bias=bias,
            wnids=list(wnids),
            class_names=dict(names),
            provenance=dict(provenance),
            epoch=int(state["epoch"]),
            best_top1=float(state["best_accuracy"]),
            history=history,
            optimizer_state=state["optimizer"],
            best_epoch=None if "best_epoch" not in state else int(state["best_epoch"]),
            best_by=state.get("selection"),
            settings=state.get("args"),
            generator_state=state.get("generator"),
            trained_layer=state.get("trainable"),
            standardization=state.get("standardization"),
            selected_from=state.get("selected_from"),
            replay=checked_replay(state.get("replay"), origin, *weight.shape),
        )

    def replay_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The replay set's features as float32 and its labels, or None for a checkpoint
        written before it existed."""
        if self.replay is None:
            return None
        return self.replay["features"].float(), self.replay["labels"]


def replay_entry(features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `replay` field: features (N, D) stored as float16 (2 D bytes a row) and their labels."""
    return {"features": features.detach().cpu().half(), "labels": labels.detach().cpu().long()}


def checked_replay(
    replay: object, origin: str, num_classes: int, feature_dim: int
) -> dict[str, torch.Tensor] | None:
    """`replay` as read, None when absent; refused unless it holds finite features of the head's
    width and labels of its classes."""
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
            f"{origin}: 'replay' must hold finite features (N, {feature_dim}) and N labels "
            f"in 0..{num_classes - 1}"
        )
    return {"features": features, "labels": labels.long()}


def preprocess_of(checkpoint: Checkpoint, origin: str) -> Preprocess:
    """The preprocessing the training images had, parsed as JSON (never evaluated) and checked
    to be the parameters of `extract.preprocess.Preprocess`: what `live` feeds frames through.

    Apart from `load` because it imports torchvision, which training does not need.
    """
    from torchvision.transforms import InterpolationMode

    from extract.preprocess import Preprocess

    try:
        params = Preprocess.from_json(checkpoint.provenance["preprocess"])
        numbers = (*params.mean, *params.std)
        if not (
            isinstance(params.resize_size, int)
            and isinstance(params.crop_size, int)
            and 0 < params.crop_size <= params.resize_size
            and len(numbers) == 6
            and all(isinstance(x, (int, float)) for x in numbers)
            and min(params.std) > 0
        ):
            raise ValueError("not the parameters")
        InterpolationMode(params.interpolation)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        reason = "not JSON" if isinstance(error, json.JSONDecodeError) else "not the parameters"
        raise UserError(
            f"{origin}: the recorded preprocessing is {reason} of extract.preprocess.Preprocess"
        ) from None
    return params


def checked_layer(layer: object, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight and bias (exactly those two), float32, shaped as a D -> C layer."""
    if not isinstance(layer, dict) or set(layer) != {"weight", "bias"}:
        raise UserError(f"{origin}: state_dict must hold exactly 'weight' and 'bias'")
    weight, bias = layer["weight"], layer["bias"]
    if not (
        isinstance(weight, torch.Tensor)
        and isinstance(bias, torch.Tensor)
        and weight.ndim == 2
        and bias.shape == weight.shape[:1]
    ):
        shapes = [tuple(getattr(value, "shape", ())) for value in (weight, bias)]
        raise UserError(
            f"{origin}: head weight {shapes[0]} / bias {shapes[1]} do not fit a D -> C linear layer"
        )
    return weight.float(), bias.float()


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Save so that a crash at any moment leaves either the previous file or the new one."""
    save_dict(checkpoint.to_dict(), path)


def save_dict(state: dict, path: Path) -> None:
    """Write `state` (tensors and plain data) with `torch.save`, atomically: a checkpoint, or
    the sweep's state."""
    with atomic_write(path) as temporary, open(temporary, "wb") as stream:
        torch.save(state, stream)  # a full disk is an OSError (ENOSPC)


def load(path: Path) -> Checkpoint:
    """Load a checkpoint (a file, or a folder holding best.pt) safely, no pickled code runs,
    and check that it is one of ours."""
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return Checkpoint.from_dict(load_dict(path, "checkpoint"), str(path))


def load_dict(path: Path, what: str) -> dict:
    """What `save_dict` wrote, loaded safely (no pickled code runs); `what` names the kind of
    file in the one line that refuses a damaged or foreign one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise UserError(
                f"{path}: not a loadable {what} (damaged, or not a PyTorch file)"
            ) from None
        raise UserError(
            f"{path}: refused, it holds pickled Python objects, not only tensors "
            f"and plain data (loading them could run code)"
        ) from None
    except Exception as error:  # foreign pickles, damaged zips, other formats
        raise UserError(f"{path}: not a loadable {what} ({first_line(error)})") from None


def check_compatible(
    checkpoint: Checkpoint,
    origin: str,
    features_path: Path,
    provenance: dict[str, str],
    wnids: list[str],
    feature_dim: int,
) -> None:
    """Refuse a checkpoint trained on other classes, or on features made another way (another
    backbone, node, weights or preprocessing) or of another width, than those of the file."""
    check_trained_on(
        checkpoint.wnids,
        checkpoint.provenance,
        checkpoint.weight.shape[1],
        origin,
        features_path,
        provenance,
        wnids,
        feature_dim,
    )


def check_trained_on(
    trained_wnids: list[str],
    trained_provenance: dict[str, str],
    trained_dim: int,
    origin: str,
    features_path: Path,
    provenance: dict[str, str],
    wnids: list[str],
    feature_dim: int,
) -> None:
    """`check_compatible` for a head given by its classes, its features' provenance and its
    width: a checkpoint's, or each head of a saved sweep."""
    if trained_wnids != list(wnids):
        raise UserError(
            f"{origin}: trained on {len(trained_wnids)} classes that differ from the "
            f"{len(wnids)} of {features_path}"
        )
    recorded = trained_provenance
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
    if trained_dim != feature_dim:
        raise UserError(
            f"{origin}: the head takes {(trained_dim,)} features, "
            f"{features_path} holds {feature_dim} per image"
        )
