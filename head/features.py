"""Cached features in memory: one tensor per split, loaded once, checked once.

Features keep their stored dtype (float16 by default, half the memory of float32); the training
loop casts each batch to float32 on the fly. Before anything is read, the memory the splits need
is computed from the HDF5 shapes and compared with what the machine has, so a run that cannot fit
stops with one line instead of being killed halfway.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from extract import store
from extract.backbone import FEATURE_DIM
from extract.errors import UserError

FINITE_CHECK_ROWS = 8192
MIB = 2**20
CPU = torch.device("cpu")


@dataclasses.dataclass
class SplitTensors:
    """One split in memory; row i of every tensor is the same image."""

    name: str
    features: torch.Tensor  # (N, 4096), stored dtype
    labels: torch.Tensor  # (N,) int64
    features_flip: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class FeatureSet:
    """What training needs from a feature file: the splits, the classes and the provenance."""

    path: Path
    wnids: list[str]
    names: list[str]
    provenance: dict[str, str]
    train: SplitTensors
    val: SplitTensors | None

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def split_bytes(file: h5py.File, split: str, flip: bool) -> int:
    """Bytes one split takes in memory: features (and flipped features) plus labels."""
    group = file[split]
    names = ["features", "features_flip"] if flip else ["features"]
    total = sum(group[name].size * group[name].dtype.itemsize for name in names)
    return total + group["labels"].size * 8


def available_memory() -> int:
    """Host memory that can be allocated without swapping (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(needed: int, available: int, where: str, path: Path) -> None:
    if needed > available:
        raise UserError(
            f"{path}: the features need {needed / MIB:,.0f} MiB of {where} memory, only "
            f"{available / MIB:,.0f} MiB is available (free memory, or use fewer images)"
        )


def check_finite(path: Path, split: str, name: str, features: np.ndarray) -> None:
    """Refuse NaN or inf anywhere: one bad row silently turns every weight into NaN."""
    for start in range(0, len(features), FINITE_CHECK_ROWS):
        rows = np.isfinite(features[start:start + FINITE_CHECK_ROWS]).all(axis=1)
        if not rows.all():
            bad = int(np.flatnonzero(~rows)[0]) + start
            raise UserError(f"{path}: {split}/{name} holds NaN or inf (first in row {bad}); "
                            f"extract the features again")


def read_tensors(file: h5py.File, path: Path, split: str, num_classes: int,
                 flip: bool) -> SplitTensors:
    arrays = store.read_split(file, split, with_flip=flip)
    if arrays.features.ndim != 2 or arrays.features.shape[1] != FEATURE_DIM:
        raise UserError(f"{path}: {split}/features has shape {arrays.features.shape}, "
                        f"expected (N, {FEATURE_DIM})")
    if len(arrays.labels) == 0:
        raise UserError(f"{path}: the {split} split holds no images")
    check_finite(path, split, "features", arrays.features)
    if arrays.features_flip is not None:
        check_finite(path, split, "features_flip", arrays.features_flip)
    outside = (arrays.labels < 0) | (arrays.labels >= num_classes)
    if outside.any():
        raise UserError(f"{path}: {split} has {int(outside.sum())} images without a label in "
                        f"0..{num_classes - 1} (unlabelled images cannot be trained on)")
    return SplitTensors(
        name=split,
        features=torch.from_numpy(arrays.features),
        labels=torch.from_numpy(arrays.labels.astype(np.int64)),
        features_flip=None if arrays.features_flip is None
        else torch.from_numpy(arrays.features_flip),
    )


def load(path: Path, flip: bool = False, device: torch.device = CPU,
         report=print) -> FeatureSet:
    """Read the train split (and val when there is one) into memory after checking it fits.

    `flip` loads the flipped features of the train split when the file has them; `report`
    receives the one-line memory estimate and any notes.
    """
    with store.open_complete(path) as file:
        present = store.splits(file)
        if "train" not in present or "train" not in file:
            raise UserError(f"{path}: no 'train' split (has {', '.join(present) or 'none'}); "
                            f"extract with --splits train,val")
        classes = store.read_classes(file)
        if flip and "features_flip" not in file["train"]:
            report(f"note: {path} has no flipped features (extract with --flip); "
                   f"training on the plain view only")
            flip = False
        has_val = "val" in present and "val" in file
        needed = split_bytes(file, "train", flip) + (split_bytes(file, "val", False)
                                                     if has_val else 0)
        shapes = ", ".join(
            f"{split} {file[split]['features'].shape[0]} x {FEATURE_DIM} "
            f"{file[split]['features'].dtype}{' (+ flipped)' if split == 'train' and flip else ''}"
            for split in (["train", "val"] if has_val else ["train"])
        )
        available = available_memory()
        report(f"features: {shapes}: {needed / MIB:,.1f} MiB in memory "
               f"({available / MIB:,.0f} MiB available)")
        check_fits(needed, available, "host", path)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            check_fits(needed, free, "GPU", path)
        train = read_tensors(file, path, "train", len(classes.wnids), flip)
        val = read_tensors(file, path, "val", len(classes.wnids), False) if has_val else None
        provenance = store.provenance(file)
    for split in (train, val):
        if split is not None and device.type != "cpu":
            split.features = split.features.to(device)
            split.labels = split.labels.to(device)
            if split.features_flip is not None:
                split.features_flip = split.features_flip.to(device)
    return FeatureSet(path=path, wnids=classes.wnids, names=classes.names,
                      provenance=provenance, train=train, val=val)


def standardization(features: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of `features`, accumulated in float64 chunk by chunk.

    Dimensions that never vary (fc7 units that are always 0 after the ReLU) get std 1, so
    standardising leaves them at 0 instead of dividing by zero.
    """
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    squares = torch.zeros_like(total)
    for start in range(0, len(features), rows):
        chunk = features[start:start + rows].double()
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    count = len(features)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()
