"""The feature file: the HDF5 layout that `head` and `live` read, defined here and nowhere else.

Layout (one file per extraction)::

    /classes/wnids          (C,)  str    label index -> wnid
    /classes/names          (C,)  str    label index -> first name in words.txt
    /<split>/features       (N, 4096)    fc7 of each image (float16 by default)
    /<split>/features_flip  (N, 4096)    fc7 of the horizontally flipped image (--flip only)
    /<split>/labels         (N,)  int64  label index, -1 when unlabelled
    /<split>/paths          (N,)  str    image path relative to the data folder
    /<split>/failed         (K, 2) str   unreadable files of the split and why

Row i of features, features_flip, labels and paths is the same image. Root attributes record
the provenance (`PROVENANCE_KEYS` and the run settings) and ``complete``, true only once every
split is fully written. While a run is in progress the file lives at ``<out>.part``; it is
renamed to ``<out>`` when complete, so a file under the final name is always complete.

Crash safety: datasets are chunked and grow batch by batch; each split's ``rows`` and
``next_index`` attributes are updated after the batch's rows are written, then the file is
flushed. After a SIGKILL the rows up to ``rows`` are intact and a resumed run starts from
``next_index`` of the split's manifest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np

from extract.backbone import FEATURE_DIM
from extract.dataset import Classes, Manifest
from extract.errors import UserError

FORMAT = "fc7cache/1"
CHUNK_ROWS = 128
PROVENANCE_KEYS = ("backbone", "node", "weights", "weights_sha256", "preprocess")
RUN_KEYS = ("precision", "store_dtype", "flip", "splits")
STRING = h5py.string_dtype("utf-8")


@dataclasses.dataclass
class SplitArrays:
    """One split loaded into memory; `features` keeps the stored dtype."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    features_flip: np.ndarray | None = None


def part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def create(
    path: Path, attrs: dict, classes: Classes, manifests: list[Manifest], flip: bool
) -> h5py.File:
    """Start a new, incomplete feature file with empty, growable datasets for each split."""
    file = h5py.File(path, "w")
    file.attrs["format"] = FORMAT
    for key, value in attrs.items():
        file.attrs[key] = str(value)
    file.attrs["flip"] = flip
    file.attrs["splits"] = json.dumps([m.split for m in manifests])
    file.attrs["complete"] = False
    file.create_dataset("classes/wnids", data=classes.wnids, dtype=STRING)
    file.create_dataset("classes/names", data=classes.names, dtype=STRING)
    store_dtype = np.dtype(attrs["store_dtype"])
    for manifest in manifests:
        group = file.create_group(manifest.split)
        group.attrs["manifest_sha256"] = manifest.sha256()
        group.attrs["manifest_size"] = len(manifest.paths)
        group.attrs["rows"] = 0
        group.attrs["next_index"] = 0
        names = ["features", "features_flip"] if flip else ["features"]
        for name in names:
            group.create_dataset(
                name, shape=(0, FEATURE_DIM), maxshape=(None, FEATURE_DIM),
                chunks=(CHUNK_ROWS, FEATURE_DIM), dtype=store_dtype,
            )
        group.create_dataset("labels", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=np.int64)
        group.create_dataset("paths", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=STRING)
        group.create_dataset("failed", shape=(0, 2), maxshape=(None, 2), chunks=(256, 2),
                             dtype=STRING)
    file.flush()
    return file


def open_for_resume(path: Path, attrs: dict, manifests: list[Manifest], flip: bool) -> h5py.File:
    """Reopen an interrupted run after checking it was made the same way from the same images."""
    file = open_file(path, "r+")
    # The weights are identified by their digest; the same file under another path is fine.
    for key in ("weights_sha256", "preprocess", "backbone", "node", "precision", "store_dtype"):
        recorded = str(file.attrs.get(key))
        if recorded != str(attrs[key]):
            file.close()
            raise UserError(
                f"{path}: cannot resume, it was made with {key}={recorded[:80]!r}, "
                f"this run uses {attrs[key]!r} (use --overwrite to start again)"
            )
    if bool(file.attrs["flip"]) != flip or json.loads(file.attrs["splits"]) != [
        m.split for m in manifests
    ]:
        file.close()
        raise UserError(f"{path}: cannot resume, it was made with other --splits or --flip")
    for manifest in manifests:
        group = file[manifest.split]
        if group.attrs["manifest_sha256"] != manifest.sha256():
            file.close()
            raise UserError(
                f"{path}: cannot resume, the {manifest.split} images differ from the interrupted "
                f"run (use --overwrite to start again)"
            )
        rows = int(group.attrs["rows"])
        for name in ("features", "features_flip", "labels", "paths"):
            if name in group:
                group[name].resize(rows, axis=0)
    return file


def append(
    group: h5py.Group,
    features: np.ndarray,
    features_flip: np.ndarray | None,
    labels: list[int],
    paths: list[str],
    failed: list[tuple[str, str]],
    next_index: int,
) -> None:
    """Write one batch's rows, then move the split's progress counters, then flush."""
    rows = int(group.attrs["rows"])
    count = len(paths)
    if count:
        named = {"features": features, "features_flip": features_flip,
                 "labels": np.asarray(labels, np.int64), "paths": paths}
        for name, values in named.items():
            if values is None:
                continue
            dataset = group[name]
            dataset.resize(rows + count, axis=0)
            dataset[rows:rows + count] = values
    if failed:
        dataset = group["failed"]
        start = dataset.shape[0]
        dataset.resize(start + len(failed), axis=0)
        dataset[start:] = np.asarray(failed, dtype=object)
    group.attrs["rows"] = rows + count
    group.attrs["next_index"] = next_index
    group.file.flush()


def mark_complete(file: h5py.File) -> None:
    file.attrs["complete"] = True
    file.flush()


def open_file(path: Path, mode: str = "r") -> h5py.File:
    """Open a feature file, with a clear error for a missing file or one that is not ours."""
    if not path.is_file():
        raise UserError(f"{path}: feature file not found")
    try:
        file = h5py.File(path, mode)
    except OSError as error:
        raise UserError(f"{path}: not a readable HDF5 file ({str(error)[:120]})") from None
    if file.attrs.get("format") != FORMAT:
        file.close()
        raise UserError(f"{path}: not a feature file made by extract (format attribute missing)")
    return file


def open_complete(path: Path) -> h5py.File:
    """Open a finished feature file for reading; an interrupted run is refused."""
    file = open_file(path)
    if not bool(file.attrs["complete"]):
        file.close()
        raise UserError(f"{path}: incomplete feature file (rerun extract with --resume)")
    return file


def read_attrs(file: h5py.File) -> dict:
    """Root attributes as plain Python values."""
    return {key: value.item() if isinstance(value, np.generic) else value
            for key, value in file.attrs.items()}


def provenance(file: h5py.File) -> dict[str, str]:
    """What a checkpoint must carry to rebuild the exact backbone and preprocessing."""
    return {key: str(file.attrs[key]) for key in PROVENANCE_KEYS}


def read_classes(file: h5py.File) -> Classes:
    return Classes(
        wnids=list(file["classes/wnids"].asstr()[()]),
        names=list(file["classes/names"].asstr()[()]),
    )


def splits(file: h5py.File) -> list[str]:
    return json.loads(file.attrs["splits"])


def read_split(file: h5py.File, split: str, with_flip: bool = False) -> SplitArrays:
    """Load one split whole; features stay in their stored dtype (float16 by default)."""
    if split not in file:
        raise UserError(f"{file.filename}: no {split!r} split (has {', '.join(splits(file))})")
    group = file[split]
    flip = None
    if with_flip:
        if "features_flip" not in group:
            raise UserError(f"{file.filename}: no flipped features (extract with --flip)")
        flip = group["features_flip"][()]
    return SplitArrays(
        features=group["features"][()],
        labels=group["labels"][()],
        paths=list(group["paths"].asstr()[()]),
        features_flip=flip,
    )


def read_failed(file: h5py.File, split: str) -> list[tuple[str, str]]:
    return [tuple(row) for row in file[split]["failed"].asstr()[()]]


def merge(parts: list[Path], out_part: Path, classes: Classes, manifests: list[Manifest],
          block_rows: int = 8192) -> h5py.File:
    """Concatenate complete per-rank files, in rank order, into one file of the usual layout.

    Each part holds a contiguous slice of every split's manifest; a missing or incomplete part
    is an error (a virtual dataset would read it silently as zeros).
    """
    sources = [open_complete(part) for part in parts]
    try:
        attrs = {key: str(sources[0].attrs[key]) for key in (
            *PROVENANCE_KEYS, "precision", "store_dtype", "torch_version", "torchvision_version")}
        flip = bool(sources[0].attrs["flip"])
        file = create(out_part, attrs, classes, manifests, flip)
        for manifest in manifests:
            target = file[manifest.split]
            next_index = 0
            for source in sources:
                group = source[manifest.split]
                rows = int(group.attrs["rows"])
                next_index += int(group.attrs["manifest_size"])
                failed = [tuple(row) for row in group["failed"].asstr()[()]]
                for start in range(0, max(rows, 1), block_rows):
                    stop = min(start + block_rows, rows)
                    append(
                        target, group["features"][start:stop],
                        group["features_flip"][start:stop] if flip else None,
                        group["labels"][start:stop].tolist(),
                        list(group["paths"].asstr()[start:stop]),
                        failed if stop == rows else [],
                        next_index if stop == rows else int(target.attrs["next_index"]),
                    )
        return file
    finally:
        for source in sources:
            source.close()
