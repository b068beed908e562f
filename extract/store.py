"""The feature file: the HDF5 layout that `head` and `live` read, defined here and nowhere else.

Layout (one file per extraction)::

    /classes/wnids          (C,)  str    label index -> wnid
    /classes/names          (C,)  str    label index -> first name in words.txt
    /<split>/features       (N, D)       the backbone's features of each image (float16 default)
    /<split>/features_flip  (N, D)       features of the horizontally flipped image (--flip only)
    /<split>/labels         (N,)  int64  label index, -1 when unlabelled
    /<split>/paths          (N,)  str    image path relative to the data folder
    /<split>/failed         (K, 2) str   unreadable files of the split and why

Row i of features, features_flip, labels and paths is the same image. Root attributes
(assembled by `root_attributes` alone) record the provenance (`PROVENANCE_KEYS`: backbone, node,
weights, weights_sha256, preprocess), the feature dimension D (``feature_dim``; a file written
before it was recorded has D only as its datasets' width), the run settings and ``complete``,
true only once every split is fully written. While a run is in progress the file lives at
``<out>.part``; it is renamed to ``<out>`` when complete, so a file under the final name is
always complete.

Crash safety: datasets are chunked and grow batch by batch; each split's ``rows``,
``failed_count`` and ``next_index`` attributes are updated after the batch is written, then the
file is flushed. After a SIGKILL the rows up to ``rows`` are intact; a resumed run copies them
to a fresh file and continues from ``next_index`` of the split's manifest.

Integrity: features and labels carry HDF5's Fletcher-32 checksum on every chunk, so bytes changed
on the disk are found when read, and reported as one error naming the file, split and rows.
Everything that reads the layout goes through the functions below (`read_split`, `read_rows`,
`read_rows_into`, `read_labels`, `read_paths`, `split_info`, `progress`); nothing else opens the
datasets or reads their attributes. Resuming an interrupted run and merging per-rank files, which
copy one file's rows into another, live in `extract.parts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import h5py
import numpy as np

from extract import lock
from extract.atomic import atomic_write
from extract.dataset import Classes, Manifest
from extract.errors import UserError, WriteFailed, first_line
from extract.provenance import PROVENANCE_KEYS
from extract.room import check_room, handle_release_errors_silenced

FORMAT = "fc7cache/1"
CHUNK_ROWS = 128
STRING = h5py.string_dtype("utf-8")


@dataclasses.dataclass
class SplitArrays:
    """One split loaded into memory (or its features left in the file: `read_split`'s `lazy`);
    `features` keeps the stored dtype."""

    features: np.ndarray | h5py.Dataset
    labels: np.ndarray
    paths: list[str]
    features_flip: np.ndarray | h5py.Dataset | None = None


def printable(path: str) -> str:
    """A path as valid UTF-8 text: bytes of a non-UTF-8 file name become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def root_attributes(
    provenance: dict[str, str],
    *,
    feature_dim: int,
    precision: str,
    store_dtype: str,
    torch_version: str,
    torchvision_version: str,
) -> dict[str, str | int]:
    """The root attributes of a run, as `create` writes them (it adds the format, flip, the
    splits and the complete flag): the backbone's provenance, D, the compute precision, the
    stored dtype, and the versions that computed the features. The one place they are
    assembled: extraction, merging, the benchmarks and the tests all build them here."""
    return {
        **{key: provenance[key] for key in PROVENANCE_KEYS},
        "feature_dim": int(feature_dim),
        "precision": precision,
        "store_dtype": store_dtype,
        "torch_version": torch_version,
        "torchvision_version": torchvision_version,
    }


def create(
    path: Path, attrs: dict, classes: Classes, manifests: list[Manifest], flip: bool
) -> h5py.File:
    """Start a new, incomplete feature file with empty, growable datasets for each split.

    The empty file is built under a temporary name and renamed into place once written, so
    `path` never holds a half-made skeleton, whenever the process is killed.
    """
    try:
        with atomic_write(path) as skeleton, h5py.File(skeleton, "w") as file:
            write_skeleton(file, attrs, classes, manifests, flip)
    except (OSError, RuntimeError) as error:  # a full disk, most likely
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else first_line(error)
        raise WriteFailed(f"{path}: cannot be created ({reason})") from None
    return h5py.File(path, "r+")


def write_skeleton(
    file: h5py.File, attrs: dict, classes: Classes, manifests: list[Manifest], flip: bool
) -> None:
    file.attrs["format"] = FORMAT
    for key, value in attrs.items():
        file.attrs[key] = int(value) if key == "feature_dim" else str(value)
    file.attrs["flip"] = flip
    file.attrs["splits"] = json.dumps([m.split for m in manifests])
    file.attrs["complete"] = False
    file.create_dataset("classes/wnids", data=classes.wnids, dtype=STRING)
    file.create_dataset("classes/names", data=classes.names, dtype=STRING)
    store_dtype = np.dtype(attrs["store_dtype"])
    feature_dim = int(attrs["feature_dim"])
    for manifest in manifests:
        group = file.create_group(manifest.split)
        group.attrs["manifest_sha256"] = manifest.sha256()
        group.attrs["manifest_size"] = len(manifest.paths)
        group.attrs["rows"] = 0
        group.attrs["failed_count"] = 0
        group.attrs["next_index"] = 0
        names = ["features", "features_flip"] if flip else ["features"]
        for name in names:
            group.create_dataset(
                name,
                shape=(0, feature_dim),
                maxshape=(None, feature_dim),
                chunks=(CHUNK_ROWS, feature_dim),
                dtype=store_dtype,
                fletcher32=True,
            )
        group.create_dataset(
            "labels",
            shape=(0,),
            maxshape=(None,),
            chunks=(4096,),
            dtype=np.int64,
            fletcher32=True,
        )
        group.create_dataset("paths", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=STRING)
        group.create_dataset(
            "failed", shape=(0, 2), maxshape=(None, 2), chunks=(256, 2), dtype=STRING
        )


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
    if features is not None:  # a new chunk may be allocated whole, however few rows go in
        chunk = group["features"].chunks[0] * features.shape[1] * features.itemsize
        check_room(
            group.file, max(features.nbytes, chunk) * (2 if features_flip is not None else 1)
        )
    reason = None
    with handle_release_errors_silenced():
        try:
            write_rows(group, features, features_flip, labels, paths, failed, next_index)
        except (OSError, RuntimeError) as error:  # h5py reports a failed write as either
            reason = str(error).split("(")[0].strip() or type(error).__name__
        # Leaving `except` frees the failed write's frames, and HDF5 releases the handles they
        # held here, while the hooks are still silenced; raising from within would keep them.
    if reason is not None:
        raise OSError(reason)


def write_rows(group, features, features_flip, labels, paths, failed, next_index) -> None:
    rows = int(group.attrs["rows"])
    count = len(paths)
    if count:
        named = {
            "features": features,
            "features_flip": features_flip,
            "labels": np.asarray(labels, np.int64),
            "paths": [printable(p) for p in paths],
        }
        for name, values in named.items():
            if values is None:
                continue
            dataset = group[name]
            dataset.resize(rows + count, axis=0)
            dataset[rows : rows + count] = values
    failed_rows = int(group.attrs["failed_count"])
    if failed:
        dataset = group["failed"]
        start = failed_rows
        dataset.resize(start + len(failed), axis=0)
        dataset[start:] = np.asarray([(printable(p), r) for p, r in failed], dtype=object)
    group.attrs["rows"] = rows + count
    group.attrs["failed_count"] = failed_rows + len(failed)
    group.attrs["next_index"] = next_index
    group.file.flush()


def mark_complete(file: h5py.File) -> None:
    """Mark the file complete, and cut off the room reserved past HDF5's last allocation."""
    file.attrs["complete"] = True
    file.flush()
    os.truncate(file.filename, file.id.get_filesize())


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_file(path: Path, mode: str = "r") -> h5py.File:
    """Open a feature file, with a clear error for a missing file, one still being written (by
    which process), a damaged one, or one that is not ours."""
    check_not_in_progress(path)
    if not path.is_file():
        raise UserError(f"{path}: feature file not found")
    try:
        file = h5py.File(path, mode)
    except OSError as error:
        with open(path, "rb") as raw:
            ours = raw.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
        if ours:
            raise UserError(
                f"{path}: damaged or truncated HDF5 file ({first_line(error)}); extract the "
                f"features again (python -m extract ... --overwrite)"
            ) from None
        raise UserError(f"{path}: not a readable HDF5 file ({first_line(error)})") from None
    if file.attrs.get("format") != FORMAT:
        file.close()
        raise UserError(f"{path}: not a feature file made by extract (format attribute missing)")
    return file


def check_not_in_progress(path: Path) -> None:
    """A file that an extract run is writing now (its final name, or the .part it writes) is
    named as such, with the writer's pid, rather than as missing or locked."""
    out = path.with_name(path.name.removesuffix(".part"))
    pid = lock.writer_pid(out)
    if path.name.endswith(".part") and pid:
        raise UserError(
            f"{path}: extract (pid {pid}) is still writing this file; it becomes {out.name} "
            f"when complete"
        )
    if not path.exists() and part_path(path).exists():
        if pid:
            raise UserError(
                f"{path}: still being written by extract (pid {pid}); it appears under this "
                f"name when complete"
            )
        raise UserError(
            f"{path}: not complete, an interrupted extract run left {part_path(path).name} "
            f"(rerun extract with --resume)"
        )


def open_complete(path: Path) -> h5py.File:
    """Open a finished feature file for reading; an interrupted run is refused."""
    file = open_file(path)
    if not bool(file.attrs["complete"]):
        file.close()
        raise UserError(f"{path}: incomplete feature file (rerun extract with --resume)")
    return file


def read_attrs(file: h5py.File) -> dict:
    """Root attributes as plain Python values."""
    return {
        key: value.item() if isinstance(value, np.generic) else value
        for key, value in file.attrs.items()
    }


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


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What a reader plans with before reading a split: its size, width, dtype and chunking."""

    shape: tuple[int, ...]  # of the features: (rows, D)
    dtype: np.dtype
    chunk_rows: int
    flip: bool  # whether it holds features_flip

    @property
    def rows(self) -> int:
        return self.shape[0]


def feature_dim(file: h5py.File) -> int:
    """D, the length of each feature vector (older files record it only as the datasets' width)."""
    if "feature_dim" in file.attrs:
        return int(file.attrs["feature_dim"])
    return int(file[splits(file)[0]]["features"].shape[1])


def has_split(file: h5py.File, split: str) -> bool:
    return split in splits(file) and split in file


def check_split(file: h5py.File, split: str) -> h5py.Group:
    if not has_split(file, split):
        raise UserError(f"{file.filename}: no {split!r} split (has {', '.join(splits(file))})")
    return file[split]


def split_info(file: h5py.File, split: str) -> SplitInfo:
    dataset = check_split(file, split)["features"]
    return SplitInfo(
        shape=tuple(int(n) for n in dataset.shape),
        dtype=dataset.dtype,
        chunk_rows=dataset.chunks[0] if dataset.chunks else CHUNK_ROWS,
        flip="features_flip" in file[split],
    )


def damaged(file: h5py.File, split: str, name: str, start: int, stop: int) -> UserError:
    """The error for a read that failed: the first chunk in start..stop whose checksum fails."""
    dataset = file[split][name]
    step = dataset.chunks[0] if dataset.chunks else stop - start
    for first in range(start - start % step, stop, step):
        last = min(first + step, len(dataset))
        try:
            dataset[first:last]
        except OSError:
            return UserError(
                f"{file.filename}: {split}/{name} rows {first}-{last - 1} are damaged "
                f"(their checksum does not match); extract the features again"
            )
    return UserError(f"{file.filename}: {split}/{name} rows {start}-{stop - 1} could not be read")


def read_rows(
    file: h5py.File, split: str, name: str = "features", start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Rows start..stop of `features`, `features_flip` or `labels`, checksums verified."""
    dataset = check_split(file, split)[name]
    stop = len(dataset) if stop is None else stop
    try:
        return dataset[start:stop]
    except OSError:
        raise damaged(file, split, name, start, stop) from None


def read_rows_into(
    file: h5py.File, split: str, name: str, out: np.ndarray, start: int, stop: int, at: int
) -> None:
    """Rows start..stop of `name` straight into out[at:], with no intermediate copy."""
    try:
        file[split][name].read_direct(out, np.s_[start:stop], np.s_[at : at + stop - start])
    except OSError:
        raise damaged(file, split, name, start, stop) from None


def read_labels(file: h5py.File, split: str) -> np.ndarray:
    return read_rows(file, split, "labels")


def read_split(
    file: h5py.File, split: str, with_flip: bool = False, lazy: bool = False
) -> SplitArrays:
    """Load one split whole; features stay in their stored dtype (float16 by default).

    `lazy`: the features stay in the file, as h5py datasets that read the rows they are sliced
    with (for splits larger than memory), while `file` is open; a damaged chunk then raises
    h5py's OSError when its rows are read.
    """
    group = check_split(file, split)
    flip = None
    if with_flip:
        if "features_flip" not in group:
            raise UserError(f"{file.filename}: no flipped features (extract with --flip)")
        flip = group["features_flip"] if lazy else read_rows(file, split, "features_flip")
    return SplitArrays(
        features=group["features"] if lazy else read_rows(file, split),
        labels=read_labels(file, split),
        paths=list(group["paths"].asstr()[()]),
        features_flip=flip,
    )


def read_failed(file: h5py.File, split: str) -> list[tuple[str, str]]:
    """The split's unreadable files and why, up to its committed count (a run killed between
    growing the dataset and moving the count leaves rows past it)."""
    count = int(file[split].attrs["failed_count"])
    return [tuple(row) for row in file[split]["failed"].asstr()[:count]]


def read_paths(file: h5py.File, split: str, start: int = 0, stop: int | None = None) -> list[str]:
    return list(check_split(file, split)["paths"].asstr()[start:stop])


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far a split was written: its committed rows, the manifest position a resumed run
    continues from, and the manifest it was made from (its size and digest)."""

    rows: int
    next_index: int
    manifest_size: int
    manifest_sha256: str


def progress(file: h5py.File, split: str) -> Progress:
    attrs = file[split].attrs
    return Progress(
        rows=int(attrs["rows"]),
        next_index=int(attrs["next_index"]),
        manifest_size=int(attrs["manifest_size"]),
        manifest_sha256=str(attrs["manifest_sha256"]),
    )
