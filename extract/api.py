"""extract from Python: `run` does what `python -m extract` does, `load` opens what it wrote.

The command parses its arguments and calls `run`, so the two cannot drift apart. Expected
problems raise `extract.errors.UserError` with the line the command prints; nothing here prints
except the progress bar, which `progress=False` turns off.

This module stays light: the image pipeline (torchvision, the DataLoader) is imported when `run`
is called, so that importing `extract` for its reader or its errors does not load it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from extract import store
from extract.device import available_memory
from extract.errors import UserError

if TYPE_CHECKING:
    from extract.runner import Summary


def run(
    data: str | os.PathLike | Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    **options: Any,
) -> Summary:
    """Extract the features of `data` into the HDF5 file `out`.

    `data` is what ``--data`` takes: a dataset folder, one SOURCE, or a mapping of split to
    SOURCE (``{"train": "train.csv", "val": "shards/val-{0000..0007}.tar"}``): an ImageFolder
    tree, a CSV or TSV manifest, WebDataset tar shards or Parquet files (docs/inputs.md).

    `options` are the options of ``python -m extract``, spelled with underscores and with the
    same defaults: ``splits`` (a list or "train,val"; default: train and val where present),
    ``backbone`` ("alexnet", or any torchvision classification network), ``node`` (None: the
    input of the network's ImageNet classifier, fc7 for AlexNet), ``weights`` ("imagenet",
    a torchvision weights name, "random" or a state_dict file), ``device`` ("auto"),
    ``batch_size`` (128), ``workers`` (decoding processes; None: one per core with CUDA, at
    most 8 on the CPU; 0 decodes in this process), ``decode`` ("workers", or "device": JPEG
    files decoded on the GPU), ``precision`` ("auto"), ``store_dtype`` ("float16"),
    ``resume``, ``overwrite``, ``strict``, ``flip`` (all False), ``progress`` (True: a tqdm
    bar, also in notebooks), ``classes`` (a class file; None: the train split's sorted labels),
    ``image_column`` ("image") and ``label_column`` ("label").

    Returns the `Summary` the command prints (images, failed, seconds, file_bytes). Under
    ``torchrun`` each process extracts its share and the first merges them, as the command does.
    Raises `UserError` for what the command reports as an error, and TypeError for an unknown
    option.
    """
    from extract import distributed, runner  # the image pipeline, only when extracting
    from extract.sources import parse_data

    fields = {field.name for field in dataclasses.fields(runner.Options)} - {"data", "out"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"run() got unknown options {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    if isinstance(options.get("splits"), str):
        options["splits"] = [s.strip() for s in options["splits"].split(",") if s.strip()] or None
    if isinstance(options.get("weights"), os.PathLike):
        options["weights"] = os.fspath(options["weights"])
    if isinstance(data, Mapping):
        sources = parse_data([f"{split}={os.fspath(spec)}" for split, spec in data.items()])
    else:
        sources = parse_data([data])
    if options.get("classes") is not None:
        options["classes"] = Path(options["classes"])
    settings = runner.Options(data=sources, out=Path(out), **options)
    if settings.batch_size < 1 or (settings.workers is not None and settings.workers < 0):
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if settings.resume and settings.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    return distributed.run(settings) if distributed.launched() else runner.run(settings)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a feature file; row i of every field is the same image.

    `features` is (N, D) in the stored dtype (float16 unless extracted with
    ``store_dtype="float32"``): a NumPy array, or, for a file loaded lazily, an `h5py.Dataset`
    that reads the rows it is sliced with (``features[:1000]`` is a NumPy array).
    """

    features: np.ndarray | h5py.Dataset
    labels: np.ndarray  # (N,) int64 class index; -1 where the split is unlabelled (test)
    paths: list[str]  # image path relative to the data folder
    features_flip: np.ndarray | h5py.Dataset | None  # of the mirrored images (``flip=True``)
    failed: list[tuple[str, str]]  # unreadable images of the split and why


@dataclasses.dataclass
class FeatureFile:
    """A complete feature file: its splits by name, its classes and how it was made.

    ``cache["train"]`` is the train `Split`; ``wnids[label]`` and ``names[label]`` name a label;
    `provenance` is what a head trained on it records (backbone, node, weights and their
    SHA-256, the preprocessing as JSON). Usable as a context manager; `close` matters only for
    a lazily loaded file, whose features are read from the open file.
    """

    path: Path
    wnids: list[str]
    names: list[str]
    provenance: dict[str, str]
    splits: dict[str, Split]
    lazy: bool
    file: h5py.File | None = dataclasses.field(default=None, repr=False)

    def __getitem__(self, split: str) -> Split:
        """The split of that name; a missing one is the error head.evaluate --split gives."""
        if split not in self.splits:
            raise UserError(f"{self.path}: no {split!r} split (has {', '.join(self.splits)})")
        return self.splits[split]

    def close(self) -> None:
        """Close the file a lazily loaded cache reads from; its features then read no more."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load(path: str | os.PathLike, lazy: bool | None = None) -> FeatureFile:
    """Open a complete feature file read-only: every split's features, labels, paths and
    failures, the classes and the provenance.

    Features keep the stored dtype. By default (`lazy` None) they are read into NumPy arrays
    when they fit in the memory available, and otherwise left in the file as `h5py.Dataset`
    objects that read the rows they are sliced with; True or False forces either. h5py cannot
    memory-map the file's chunked datasets, so lazy rows are read, not mapped. A lazily loaded
    file stays open until `FeatureFile.close` (or the end of a ``with`` block).

    An incomplete file (a run still going or interrupted), a missing file or one that extract
    did not write raises `UserError` with the line the commands print.
    """
    path = Path(path)
    file = store.open_complete(path)
    try:
        flip = bool(store.read_attrs(file)["flip"])
        names = store.splits(file)
        left = {name: store.read_split(file, name, flip, lazy=True) for name in names}
        if lazy is None:
            stored = sum(
                arrays.features.nbytes + (arrays.features_flip.nbytes if flip else 0)
                for arrays in left.values()
            )
            lazy = stored > available_memory()
        read = left if lazy else {name: store.read_split(file, name, flip) for name in names}
        classes = store.read_classes(file)
        splits = {
            name: Split(
                features=arrays.features,
                labels=arrays.labels,
                paths=arrays.paths,
                features_flip=arrays.features_flip,
                failed=store.read_failed(file, name),
            )
            for name, arrays in read.items()
        }
        loaded = FeatureFile(
            path=path,
            wnids=classes.wnids,
            names=classes.names,
            provenance=store.provenance(file),
            splits=splits,
            lazy=lazy,
            file=file if lazy else None,
        )
    except BaseException:
        file.close()
        raise
    if not lazy:
        file.close()
    return loaded
