"""Reading a dataset folder: which classes it has and which images each split holds.

Two layouts are understood, and nothing inside the folder is ever written to:

* Tiny ImageNet: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*``,
  ``val/images/*`` labelled by ``val/val_annotations.txt``, ``test/images/*`` (unlabelled).
* ImageFolder: ``<split>/<class>/*`` for each split, or ``<class>/*`` directly under the
  root, which is then the ``train`` split.

Classes are the sorted wnids of ``wnids.txt`` (or the sorted class folders of the train split);
label i is the i-th of them. This module is the one place that decides that order.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from pathlib import Path

from extract.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
UNLABELED = -1


@dataclasses.dataclass(frozen=True)
class Classes:
    """Label index -> wnid (or folder name) and its human-readable name."""

    wnids: list[str]
    names: list[str]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The images of one split, in the order their features are stored.

    `units` are the first rows of the source's shards (or Parquet row groups): a batch never
    spans two, so a worker reads one shard per batch, and whole shards can go to `torchrun`'s
    ranks with every batch as one process makes it. A folder or a CSV is one unit. `failures`
    are rows known to fail before any image is read (a sample with no image, a label that is
    not a class), by row, with the reason. `reader` reads the images (`extract.sources`); row i
    is the reader's sample ``reader_offset + i``, so a slice of the manifest keeps its reader.
    """

    split: str
    paths: list[str]  # the source id of each row: for a folder, relative to it, '/'-separated
    labels: list[int]
    units: tuple[int, ...] = (0,)
    failures: dict[int, str] = dataclasses.field(default_factory=dict)
    reader: object = dataclasses.field(default=None, compare=False, repr=False)
    reader_offset: int = 0

    def batches(self, start: int, batch_size: int) -> list[range]:
        """The rows of each batch from `start` (a batch's first row) on, none across a unit."""
        ends = [*self.units[1:], len(self.paths)]
        return [
            range(first, min(first + batch_size, end))
            for unit, end in zip(self.units, ends)
            for first in range(unit, end, batch_size)
            if first >= start
        ]

    def slice(self, first: int, last: int) -> Manifest:
        """Rows first..last-1, their units, failures and place in the reader kept."""
        return Manifest(
            self.split,
            self.paths[first:last],
            self.labels[first:last],
            tuple(sorted({0, *(unit - first for unit in self.units if first < unit < last)})),
            {row - first: why for row, why in self.failures.items() if first <= row < last},
            self.reader,
            self.reader_offset + first,
        )

    def sha256(self) -> str:
        """Fingerprint of the image list, so a resumed run can tell it is the same one."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, sorted; symlinked folders are not followed (no loops)."""
    return [folder / relative for relative in image_paths(folder, folder)]


def image_paths(folder: Path, root: Path) -> list[str]:
    """`list_images(folder)` as '/'-separated paths relative to `root`, made from strings:
    a `Path` per file cost 0.2 s per 1,000 files on a 2-core CPU, most of a run's start."""
    found = []
    top = os.fspath(folder)
    for directory, subdirs, files in os.walk(top):
        subdirs.sort()
        prefix = Path(directory).relative_to(root).as_posix() + "/"
        prefix = "" if prefix == "./" else prefix
        found.extend(
            prefix + name
            for name in sorted(files)
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        )
    return found


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    if not any(root.iterdir()):
        raise UserError(f"{root}: data folder is empty")


def read_words(path: Path) -> dict[str, str]:
    """``words.txt``: wnid TAB comma-separated names -> wnid -> first name."""
    names = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        wnid, sep, words = line.partition("\t")
        if not sep or not wnid.strip():
            raise UserError(f"{path}:{number}: expected 'wnid<TAB>names', got {line[:60]!r}")
        names[wnid.strip()] = words.split(",")[0].strip() or wnid.strip()
    return names


def first_repeated(values: list[str]) -> str | None:
    """The first value (in sorted order) that `values` holds more than once, or None."""
    repeated = [value for value, count in collections.Counter(values).items() if count > 1]
    return min(repeated) if repeated else None


def read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in read_lines(path) if line.strip()]
    repeated = first_repeated(wnids)
    if repeated is not None:
        raise UserError(f"{path}: wnid {repeated} is listed more than once")
    return wnids


def read_val_annotations(path: Path) -> dict[str, str]:
    """``val_annotations.txt``: file TAB wnid TAB box -> file name -> wnid."""
    labels = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise UserError(f"{path}:{number}: expected 'file<TAB>wnid<TAB>box', got {line[:60]!r}")
        labels[fields[0].strip()] = fields[1].strip()
    return labels


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None


def is_tiny_imagenet(root: Path) -> bool:
    return (root / "wnids.txt").is_file() or (root / "val" / "val_annotations.txt").is_file()


def train_folder(root: Path) -> Path:
    """The folder whose subfolders are the training classes."""
    return root / "train" if (root / "train").is_dir() else root


def read_classes(root: Path) -> Classes:
    """The class list: sorted wnids of wnids.txt, else the sorted class folders of train."""
    check_root(root)
    if (root / "wnids.txt").is_file():
        wnids = sorted(read_wnids(root / "wnids.txt"))
    else:
        folder = train_folder(root)
        wnids = sorted(
            entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name not in SPLITS
        )
    if not wnids:
        raise UserError(f"{root}: no classes found (no wnids.txt and no train/<class>/ folders)")
    words = read_words(root / "words.txt") if (root / "words.txt").is_file() else {}
    return Classes(wnids=wnids, names=[words.get(wnid, wnid) for wnid in wnids])


def default_splits(root: Path) -> list[str]:
    """train, and val when the folder has one (test only when asked for)."""
    return ["train", "val"] if (root / "val").is_dir() else ["train"]


def read_manifest(root: Path, split: str, classes: Classes) -> Manifest:
    """List the images of one split with their labels (-1 for unlabelled test images)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    index = {wnid: label for label, wnid in enumerate(classes.wnids)}
    folder = root / split
    if split == "train":
        folder = train_folder(root)
    elif not folder.is_dir():
        raise UserError(f"{folder}: split folder not found")

    if split == "val" and (folder / "val_annotations.txt").is_file():
        annotations_file = folder / "val_annotations.txt"
        annotations = read_val_annotations(annotations_file)
        images = image_paths(folder / "images", root) if (folder / "images").is_dir() else []
        labels = []
        for image in images:
            name = image.rsplit("/", 1)[-1]
            wnid = annotations.get(name)
            if wnid is None:
                raise UserError(f"{annotations_file}: no line for {image}")
            if wnid not in index:
                raise UserError(
                    f"{annotations_file}: {name} is labelled {wnid!r}, not a known wnid"
                )
            labels.append(index[wnid])
    elif split == "test" and (folder / "images").is_dir():
        images = image_paths(folder / "images", root)
        labels = [UNLABELED] * len(images)
    else:
        images, labels = [], []
        for wnid in classes.wnids:
            class_folder = folder / wnid
            for image in image_paths(class_folder, root) if class_folder.is_dir() else []:
                images.append(image)
                labels.append(index[wnid])
        if split != "train":
            unknown = sorted(
                entry.name
                for entry in folder.iterdir()
                if entry.is_dir() and entry.name not in index and entry.name != "images"
            )
            if unknown:
                raise UserError(f"{folder / unknown[0]}: class folder not among the train classes")
            if not images and (folder / "images").is_dir():
                images = image_paths(folder / "images", root)
                labels = [UNLABELED] * len(images)
    if not images:
        raise UserError(f"{folder}: no images found")
    return Manifest(split=split, paths=images, labels=labels)
