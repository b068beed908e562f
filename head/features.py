"""Cached features for training: in memory when they fit, streamed from the file when not.

In memory, each split is one tensor, loaded once, checked once. Features keep their stored dtype
(float16 by default, half the memory of float32); the training loop casts each batch to float32 on
the fly. Before anything is read, the memory the splits need is computed from the HDF5 shapes and
compared with what the machine has (and `--max-memory`).

Streamed (`--stream`, or by itself when the features do not fit), a split stays on disk and is
read in blocks of whole HDF5 chunks: an epoch visits the blocks in an order drawn from the
training generator, a few blocks at a time (as many as the memory bound allows), and shuffles the
rows within those blocks. Memory for features is then the block buffer, whatever the file's size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from extract import flat, store
from extract.device import available_memory
from extract.errors import UserError

FINITE_CHECK_ROWS = 8192
MIB = 2**20
CPU = torch.device("cpu")
BLOCK_CHUNKS = 8  # a streamed block: this many HDF5 chunks (8 x 128 rows, 8 MiB in float16)
REPLAY_PER_CLASS = 10  # 10 kept the old classes within 4 points when teaching, 5 within 6
REPLAY_MAX_ROWS = 2000  # 16 MB of float16 at D = 4096: 2 a class for ImageNet-1k
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclasses.dataclass
class SplitTensors:
    """One split in memory; row i of every tensor is the same image."""

    name: str
    features: torch.Tensor  # (N, D), stored dtype
    labels: torch.Tensor  # (N,) int64
    features_flip: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class StreamedSplit:
    """One split left in the file and read in blocks of whole chunks; labels are in memory.

    `file_rows`, when set, makes it a part of the stored split: those rows only (sorted), as
    `--holdout` divides a streamed train split. The blocks are still the file's, read whole;
    the rows outside the part are skipped after reading.
    """

    path: Path
    name: str
    labels: torch.Tensor  # (N,) int64 of the rows this split holds: 8 bytes a row
    block_rows: int  # a multiple of the file's chunk rows, so every read is whole chunks
    buffer_blocks: int  # blocks held at once while training
    flip: bool = False  # train on features_flip as well
    file_rows: torch.Tensor | None = None  # (N,) sorted rows of the stored split; None: all
    stored_rows: int = -1  # rows of the stored split; -1: N

    def __post_init__(self) -> None:
        if self.stored_rows < 0:
            self.stored_rows = len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def blocks(self) -> int:
        return math.ceil(self.stored_rows / self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        """The stored rows [start, stop) of `block`."""
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.stored_rows)

    def held_in(self, start: int, stop: int) -> tuple[torch.Tensor | None, slice]:
        """Of the stored rows [start, stop): the offsets from `start` of those this split holds
        (None: all of them), and where their labels are in `labels`."""
        if self.file_rows is None:
            return None, slice(start, stop)
        first, last = torch.searchsorted(self.file_rows, torch.tensor([start, stop])).tolist()
        return self.file_rows[first:last] - start, slice(first, last)

    def part(self, rows: torch.Tensor) -> StreamedSplit:
        """The rows `rows` (sorted positions in this split) as a split of their own."""
        within = rows if self.file_rows is None else self.file_rows[rows]
        return dataclasses.replace(
            self, labels=self.labels[rows], file_rows=within, stored_rows=self.stored_rows
        )

    def chunks(self, device: torch.device = CPU) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) block by block in file order: for validation and statistics."""
        with store.open_file(self.path) as file:
            for block in range(self.blocks):
                start, stop = self.block_range(block)
                offsets, labels = self.held_in(start, stop)
                if offsets is not None and len(offsets) == 0:
                    continue
                rows = store.read_rows(file, self.name, "features", start, stop)
                features = torch.from_numpy(rows)
                if offsets is not None:
                    features = features.index_select(0, offsets)
                yield features.to(device), self.labels[labels].to(device)


@dataclasses.dataclass
class FeatureSet:
    """What training needs from a feature file: the splits, the classes and the provenance."""

    path: Path
    wnids: list[str]
    names: list[str]
    provenance: dict[str, str]
    feature_dim: int
    train: SplitTensors | StreamedSplit
    val: SplitTensors | StreamedSplit | None

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamedSplit)

    @property
    def has_flip(self) -> bool:
        """Whether the train split holds flipped features to train on (``--flip``)."""
        return self.train.flip if self.streamed else self.train.features_flip is not None

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def split_bytes(file: h5py.File, split: str, flip: bool) -> int:
    """Bytes one split takes in memory: features (and flipped features) plus labels."""
    info = store.split_info(file, split)
    features = info.rows * store.feature_dim(file) * info.dtype.itemsize
    return features * (2 if flip else 1) + info.rows * 8


def check_shape(file: h5py.File, path: Path, split: str) -> None:
    """Every split's features are (N, D), D being the file's recorded feature dimension."""
    shape, dim = store.split_info(file, split).shape, store.feature_dim(file)
    if len(shape) != 2 or shape[1] != dim:
        raise UserError(f"{path}: {split}/features has shape {shape}, expected (N, {dim})")


def check_fits(
    needed: int, available: int, where: str, path: Path, bound: str | None = None
) -> None:
    if needed > available:
        raise UserError(
            f"{path}: the features need {needed / MIB:,.0f} MiB of {where} memory, only "
            f"{available / MIB:,.0f} MiB is {'allowed by ' + bound if bound else 'available'} "
            f"(free memory, or use fewer images)"
        )


def check_finite(path: Path, split: str, name: str, features: np.ndarray, offset: int = 0) -> None:
    """Refuse NaN or inf anywhere: one bad row silently turns every weight into NaN."""
    for start in range(0, len(features), FINITE_CHECK_ROWS):
        rows = np.isfinite(features[start : start + FINITE_CHECK_ROWS]).all(axis=1)
        if not rows.all():
            bad = int(np.flatnonzero(~rows)[0]) + start + offset
            raise UserError(
                f"{path}: {split}/{name} holds NaN or inf (first in row {bad}); "
                f"extract the features again"
            )


def read_tensors(
    file: h5py.File, path: Path, split: str, num_classes: int, flip: bool
) -> SplitTensors:
    check_shape(file, path, split)
    arrays = store.read_split(file, split, with_flip=flip)
    if len(arrays.labels) == 0:
        raise UserError(f"{path}: the {split} split holds no images")
    check_finite(path, split, "features", arrays.features)
    if arrays.features_flip is not None:
        check_finite(path, split, "features_flip", arrays.features_flip)
    outside = (arrays.labels < 0) | (arrays.labels >= num_classes)
    if outside.any():
        raise UserError(
            f"{path}: {split} has {int(outside.sum())} images without a label in "
            f"0..{num_classes - 1} (unlabelled images cannot be trained on)"
        )
    return SplitTensors(
        name=split,
        features=torch.from_numpy(arrays.features),
        labels=torch.from_numpy(arrays.labels.astype(np.int64)),
        features_flip=None
        if arrays.features_flip is None
        else torch.from_numpy(arrays.features_flip),
    )


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GB``, ``500MB``, ``1.5GiB`` or ``1000000``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 500MB, 1.5GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def stream_buffer_blocks(
    file: h5py.File, flip: bool, has_val: bool, num_classes: int, max_memory: int
) -> tuple[int, int, int]:
    """(block rows, blocks held at once, bytes outside the buffer) for streaming in max_memory.

    Outside the buffer: the labels, the layer with its gradient, Adam's two moments and the
    exported copy, one validation block with its float32 copy, and room for batch temporaries.
    """
    info, dim = store.split_info(file, "train"), store.feature_dim(file)
    block_rows = info.chunk_rows * BLOCK_CHUNKS
    block_bytes = block_rows * dim * info.dtype.itemsize
    labels = info.rows * 8 + (store.split_info(file, "val").rows * 8 if has_val else 0)
    fixed = (
        labels
        + 5 * num_classes * (dim + 1) * 4
        + (block_bytes + block_rows * dim * 4 if has_val else 0)
        + 32 * MIB
    )
    return block_rows, (max_memory - fixed) // (block_bytes * (2 if flip else 1)), fixed


def stream_split(
    file: h5py.File,
    path: Path,
    split: str,
    num_classes: int,
    block_rows: int,
    buffer_blocks: int,
    flip: bool,
) -> StreamedSplit:
    """The split as a StreamedSplit, after the checks `read_tensors` makes, block by block."""
    check_shape(file, path, split)
    labels = store.read_labels(file, split)
    if len(labels) == 0:
        raise UserError(f"{path}: the {split} split holds no images")
    for name in ["features", "features_flip"] if flip else ["features"]:
        for start in range(0, len(labels), block_rows):
            rows = store.read_rows(file, split, name, start, start + block_rows)
            check_finite(path, split, name, rows, start)
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise UserError(
            f"{path}: {split} has {int(outside.sum())} images without a label in "
            f"0..{num_classes - 1} (unlabelled images cannot be trained on)"
        )
    return StreamedSplit(
        path=path,
        name=split,
        labels=torch.from_numpy(labels.astype(np.int64)),
        block_rows=block_rows,
        buffer_blocks=buffer_blocks,
        flip=flip,
    )


def load(
    path: Path,
    flip: bool = False,
    device: torch.device = CPU,
    report=print,
    stream: bool | None = None,
    max_memory: int | None = None,
) -> FeatureSet:
    """The train split (and val when there is one), in memory or streamed from the file.

    `stream`: True streams, False loads into memory, None (the default) loads when the features
    fit in `max_memory` and the memory available, and streams otherwise. `flip` adds the flipped
    features of the train split when the file has them; `report` receives the one-line memory
    estimate and any notes.
    """
    with store.open_complete(path) as file:
        present = store.splits(file)
        if not store.has_split(file, "train"):
            raise UserError(
                f"{path}: no 'train' split (has {', '.join(present) or 'none'}); "
                f"extract with --splits train,val"
            )
        classes = store.read_classes(file)
        feature_dim = store.feature_dim(file)
        info = {
            split: store.split_info(file, split)
            for split in present
            if store.has_split(file, split)
        }
        flat_warning = flat.flat_features(file, "train", str(path))
        if flat_warning:
            report(flat_warning)
        if flip and not info["train"].flip:
            report(
                f"note: {path} has no flipped features (extract with --flip); "
                f"training on the plain view only"
            )
            flip = False
        has_val = "val" in info
        needed = split_bytes(file, "train", flip) + (
            split_bytes(file, "val", False) if has_val else 0
        )
        shapes = ", ".join(
            f"{split} {info[split].rows} x {feature_dim} "
            f"{info[split].dtype}{' (+ flipped)' if split == 'train' and flip else ''}"
            for split in (["train", "val"] if has_val else ["train"])
        )
        available, where = available_memory(), "host"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if free < available:
                available, where = free, "GPU"
        limit = available if max_memory is None else min(max_memory, available)
        num_classes = len(classes.wnids)
        if stream is False or (stream is None and needed <= limit):
            report(
                f"features: {shapes}: {needed / MIB:,.1f} MiB in memory "
                f"({available / MIB:,.0f} MiB available)"
            )
            check_fits(
                needed,
                limit if max_memory is not None else available,
                where,
                path,
                "--max-memory" if max_memory is not None and max_memory < available else None,
            )
            train = read_tensors(file, path, "train", num_classes, flip)
            val = read_tensors(file, path, "val", num_classes, False) if has_val else None
        else:
            block_rows, buffer_blocks, fixed = stream_buffer_blocks(
                file, flip, has_val, num_classes, limit
            )
            minimum = fixed + block_rows * feature_dim * info["train"].dtype.itemsize
            if buffer_blocks < 1:
                report(
                    f"features: {shapes}: {needed / MIB:,.1f} MiB in memory, "
                    f"{minimum / MIB:,.1f} MiB streamed ({available / MIB:,.0f} MiB available)"
                )
                check_fits(
                    min(needed, minimum),
                    limit,
                    where,
                    path,
                    "--max-memory" if max_memory is not None and max_memory < available else None,
                )
            buffer_blocks = min(buffer_blocks, math.ceil(info["train"].rows / block_rows))
            why = (
                "--stream"
                if stream
                else f"more than the {limit / MIB:,.0f} MiB "
                f"{'allowed by --max-memory' if limit == max_memory else 'available'}"
            )
            buffer = (
                buffer_blocks
                * block_rows
                * feature_dim
                * info["train"].dtype.itemsize
                * (2 if flip else 1)
            )
            report(
                f"features: {shapes}: {needed / MIB:,.1f} MiB, {why}; streaming from the "
                f"file through a {buffer / MIB:,.0f} MiB buffer ({buffer_blocks} blocks of "
                f"{block_rows} rows)"
            )
            train = stream_split(file, path, "train", num_classes, block_rows, buffer_blocks, flip)
            val = (
                stream_split(file, path, "val", num_classes, block_rows, 1, False)
                if has_val
                else None
            )
        provenance = store.provenance(file)
    for split in (train, val):
        if isinstance(split, SplitTensors) and device.type != "cpu":
            split.features = split.features.to(device)
            split.labels = split.labels.to(device)
            if split.features_flip is not None:
                split.features_flip = split.features_flip.to(device)
    return FeatureSet(
        path=path,
        wnids=classes.wnids,
        names=classes.names,
        provenance=provenance,
        feature_dim=feature_dim,
        train=train,
        val=val,
    )


def split_blocks(
    split: SplitTensors | StreamedSplit, rows: int = 8192, device: torch.device = CPU
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of a split in row order, in the stored dtype: slices of `rows` rows in
    memory, the file's blocks when streamed. What reads a whole split once (statistics, k-NN,
    the ridge probe) takes either kind of split through this."""
    if isinstance(split, StreamedSplit):
        yield from split.chunks(device)
        return
    for start in range(0, len(split), rows):
        stop = start + rows
        yield split.features[start:stop].to(device), split.labels[start:stop].to(device)


def standardization(chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the rows of `chunks`, accumulated in float64.

    Dimensions that never vary (units that are always 0 after a ReLU) get std 1, so
    standardising leaves them at 0 instead of dividing by zero.
    """
    total = squares = None
    count = 0
    for chunk in chunks:
        chunk = chunk.double()
        if total is None:
            total = torch.zeros(chunk.shape[1], dtype=torch.float64, device=chunk.device)
            squares = torch.zeros_like(total)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
        count += len(chunk)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()


def replay_set(data: FeatureSet, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A few train rows of each class (features, labels), drawn with `seed`, for the checkpoint's
    replay set: what `live` teaches a new class against when the feature file is not at hand.

    Up to REPLAY_PER_CLASS rows a class, fewer when the classes are many, so that the set stays
    within REPLAY_MAX_ROWS (16 MB of float16 at D = 4096).
    """
    labels = data.train.labels.cpu()
    per_class = max(1, min(REPLAY_PER_CLASS, REPLAY_MAX_ROWS // data.num_classes))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    rows = (
        torch.cat([order[labels[order] == label][:per_class] for label in range(data.num_classes)])
        .sort()
        .values
    )
    if data.streamed:
        with store.open_complete(data.path) as file:
            features = torch.from_numpy(
                np.concatenate(
                    [
                        store.read_rows(file, "train", "features", int(row), int(row) + 1)
                        for row in rows
                    ]
                )
            )
    else:
        features = data.train.features[rows.to(data.train.features.device)].cpu()
    return features.float(), labels[rows]
