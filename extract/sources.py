"""Where a split's images come from: a folder, a CSV or TSV manifest, WebDataset tar shards or
Parquet files, given as ``--data train=SOURCE --data val=SOURCE``.

Each kind of source is one small reader class with one interface:

* ``samples()`` lists the samples cheaply, in the order their rows are stored: each one's
  source id (the path, the shard and key, or the file and row number), its label, its unit
  (the shard or Parquet row group it is in) and, where one is known without reading the
  image, why it cannot be extracted. Labels are read here, because the classes must be known
  before the first image is.
* ``read(numbers)`` is called in DataLoader workers with one batch's sample numbers, which are
  consecutive samples of one unit; it returns each one's source id and image bytes, or the
  error that stopped their reading.

Everything after that (the manifest, resume, sharding under torchrun, the failed-row list and
the feature file) is the same for every source; a row keeps only its source id.

A bare ``--data FOLDER`` keeps its own reading (Tiny ImageNet or an ImageFolder tree with split
folders, in `extract.dataset`); its files are read by `Files` like a folder source's.

A CSV's paths are read as written, relative to the CSV's folder: one pointing outside that
folder through ``..``, an absolute path or a link is read like any other. A manifest is
trusted input, as a shell script is; one from someone else should be read first.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from extract.dataset import (
    SPLITS,
    UNLABELED,
    Classes,
    Manifest,
    first_repeated,
    image_paths,
    read_lines,
)
from extract.errors import UserError
from extract.images import read_bytes

CSV_SUFFIXES = (".csv", ".tsv")
PATH_COLUMN = "path"
SPLIT_COLUMN = "split"
BRACES = re.compile(r"\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a million of them in a listing
class Sample:
    """One sample as a source lists it; `problem` is why it cannot be extracted, if known."""

    id: str
    label: str | int | None  # None: unlabelled (a folder's loose images)
    unit: int = 0
    problem: str = ""


class Source(Protocol):
    def samples(self) -> list[Sample]: ...

    def read(self, numbers: Sequence[int]) -> list[tuple[str, bytearray | Exception]]: ...


class Files:
    """Image files by path relative to a folder: a folder source, a CSV manifest, and the
    files of a bare ``--data FOLDER``. One unit: batches run across the whole split."""

    def __init__(self, root: Path, listed: list[Sample]):
        self.root = os.fspath(root)  # joined as strings: pathlib's joins cost as much as decoding
        self.listed = listed

    def samples(self) -> list[Sample]:
        return self.listed

    def read(self, numbers: Sequence[int]) -> list[tuple[str, bytearray | Exception]]:
        read = []
        for number in numbers:
            path = os.path.join(self.root, self.listed[number].id)
            try:
                read.append((path, read_bytes(path)))
            except OSError as error:  # missing, unreadable, a link loop: the file's own
                read.append((path, error))
        return read


def folder_files(root: Path, paths: list[str]) -> Files:
    """The reader of a bare ``--data FOLDER``'s manifest (its labels are the manifest's)."""
    return Files(root, [Sample(path, None) for path in paths])


def folder_source(folder: Path) -> Files:
    """An ImageFolder tree: ``<class>/**/<image>``, classes and files in sorted order. Images
    directly in the folder are unlabelled (a test split)."""
    listed = [
        Sample(path, path.split("/", 1)[0] if "/" in path else None)
        for path in image_paths(folder, folder)
    ]
    return Files(folder, listed)


def csv_source(path: Path, split: str | None, label_column: str) -> Files:
    """A CSV (or TSV) with a ``path`` column and a label column; with a ``split`` column, only
    the rows of `split`. An empty label cell is a row without a label, listed as failed."""
    rows, columns = read_table(path)
    missing = [name for name in (PATH_COLUMN, label_column) if name not in columns]
    if missing:
        raise UserError(
            f"{path}: no {' or '.join(repr(m) for m in missing)} column "
            f"(has {', '.join(repr(c) for c in columns)}; --label-column names the label's)"
        )
    by_split = split is not None and SPLIT_COLUMN in columns
    listed = []
    for number, row in enumerate(rows, start=2):
        if by_split and (row[SPLIT_COLUMN] or "").strip() != split:
            continue
        image = (row[PATH_COLUMN] or "").strip()
        if not image:
            raise UserError(f"{path}:{number}: empty {PATH_COLUMN!r} cell")
        label = (row[label_column] or "").strip()
        listed.append(Sample(image, label or None, problem="" if label else "no label"))
    return Files(path.parent, listed)


def read_table(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """A CSV's rows as dicts and its column names; a .tsv is tab-separated."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = read_lines(path)
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        rows = list(reader)
    except csv.Error as error:
        raise UserError(f"{path}:{reader.line_num}: {error}") from None
    return rows, reader.fieldnames


def csv_splits(path: Path) -> list[str]:
    """The splits a CSV's ``split`` column names, in train, val, test order; [] without one."""
    rows, columns = read_table(path)
    if SPLIT_COLUMN not in columns:
        return []
    named = {(row[SPLIT_COLUMN] or "").strip() for row in rows}
    unknown = sorted(named - set(SPLITS))
    if unknown:
        raise UserError(f"{path}: split {unknown[0]!r} in its split column; use train, val, test")
    return [split for split in SPLITS if split in named]


def expand(pattern: str) -> list[str]:
    """Brace ranges and lists (``{00000..00127}``, ``{a,b}``) in order, then glob patterns in
    sorted order; a name that is neither comes back as it is."""
    match = BRACES.search(pattern)
    if match:
        body = match.group(1)
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numbers:
            first, last = numbers.groups()
            width = len(first) if first.startswith("0") else 0
            step = 1 if int(last) >= int(first) else -1
            choices = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
        else:
            choices = body.split(",")
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [name for choice in choices for name in expand(head + choice + tail)]
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern]


def files_of(spec: str, what: str) -> list[str]:
    """The files a pattern names; each must exist, and the pattern must match one."""
    names = expand(spec)
    if not names:
        raise UserError(f"{spec}: the pattern matches no file")
    for name in names:
        if not os.path.isfile(name):
            raise UserError(f"{name}: {what} not found")
    return names


def open_source(spec: str, split: str | None, image_column: str, label_column: str) -> Source:
    """The reader for one SOURCE of ``--data SPLIT=SOURCE``, told apart by its name."""
    from extract import parquet_source, shards  # pyarrow only where Parquet is read

    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_dir():
        files = sorted(os.fspath(p) for p in path.rglob("*.parquet"))
        if files:
            return parquet_source.ParquetFiles(files, image_column, label_column)
        return folder_source(path)
    if suffix in CSV_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{spec}: manifest not found")
        return csv_source(path, split, label_column)
    if suffix == ".parquet":
        return parquet_source.ParquetFiles(
            files_of(spec, "Parquet file"), image_column, label_column
        )
    if suffix == ".tar":
        return shards.TarShards(files_of(spec, "shard"))
    if suffix == ".txt":
        if not path.is_file():
            raise UserError(f"{spec}: shard list not found")
        listed = [line.strip() for line in read_lines(path) if line.strip()]
        if not listed:
            raise UserError(f"{spec}: the shard list is empty")
        # Relative names in the list are relative to the list's folder.
        named = [os.path.join(path.parent, name) for name in listed]
        return shards.TarShards([name for pattern in named for name in files_of(pattern, "shard")])
    if not path.exists() and not glob.has_magic(spec) and not BRACES.search(spec):
        raise UserError(f"{spec}: data not found")
    raise UserError(
        f"{spec}: not a folder, a .csv or .tsv manifest, .tar shards, a shard list (.txt) "
        f"or .parquet files"
    )


def parse_data(values: Sequence[str | os.PathLike]) -> Path | dict[str, str]:
    """``--data`` values: one bare SOURCE, or SPLIT=SOURCE pairs with each split once."""
    named: dict[str, str] = {}
    bare = []
    for value in map(os.fspath, values):
        split, sep, spec = value.partition("=")
        if sep and split in SPLITS:
            if split in named:
                raise UserError(f"--data {split}=: given twice ({named[split]}, {spec})")
            if not spec:
                raise UserError(f"--data {split}=: no source after '='")
            named[split] = spec
        elif sep and re.fullmatch(r"\w+", split) and not os.path.exists(value):
            raise UserError(f"--data {split}=: unknown split; use train, val, test")
        else:
            bare.append(value)
    if bare and (named or len(bare) > 1):
        raise UserError(f"--data {bare[0]}: give every source as SPLIT=SOURCE, or one alone")
    if not named and not bare:
        raise UserError("--data: no source given")
    return named if named else Path(bare[0])


def is_source_name(spec: str) -> bool:
    """Whether a bare ``--data`` value names a manifest, shards or Parquet files (else it is a
    dataset folder, as before sources had names)."""
    suffix = Path(spec).suffix.lower()
    named = suffix in (*CSV_SUFFIXES, ".tar", ".txt", ".parquet")
    return not Path(spec).is_dir() and (named or glob.has_magic(spec) or bool(BRACES.search(spec)))


def bare_splits(spec: str, splits: list[str] | None) -> dict[str, str]:
    """A bare non-folder SOURCE: the splits its CSV names (or --splits), else train."""
    path = Path(spec)
    named = csv_splits(path) if path.suffix.lower() in CSV_SUFFIXES and path.is_file() else []
    chosen = splits or named or ["train"]
    return dict.fromkeys(chosen, spec)


def read_class_file(path: Path) -> Classes:
    """``--classes``: one class a line, optionally a readable name after a tab."""
    if not path.is_file():
        raise UserError(f"{path}: class file not found")
    wnids, names = [], []
    for line in read_lines(path):
        if not line.strip():
            continue
        wnid, _, name = line.partition("\t")
        wnids.append(wnid.strip())
        names.append(name.strip() or wnid.strip())
    repeated = first_repeated(wnids)
    if repeated is not None:
        raise UserError(f"{path}: class {repeated} is listed more than once")
    if not wnids:
        raise UserError(f"{path}: no classes in the class file")
    return Classes(wnids=wnids, names=names)


def classes_of(samples: list[Sample]) -> Classes:
    """The sorted labels of the train split: numbers in numeric order, named by their number."""
    labels = {s.label for s in samples if s.label is not None and not s.problem}
    ordered = sorted(labels, key=lambda label: (isinstance(label, str), label))
    wnids = [str(label) for label in ordered]
    return Classes(wnids=wnids, names=list(wnids))


def label_index(classes: Classes, from_file: bool):
    """label -> class index or None. With a class file an integer label is a line number (a
    `cls` member's, a Hugging Face ClassLabel's); otherwise the class named by its number."""
    index = {wnid: number for number, wnid in enumerate(classes.wnids)}

    def lookup(label: str | int) -> int | None:
        if isinstance(label, int) and from_file:
            return label if 0 <= label < len(classes.wnids) else None
        return index.get(str(label))

    return lookup


def manifest_of(split: str, source: Source, lookup) -> Manifest:
    """A split's manifest from its source's listing; a label that is not a class, or a sample
    known to be unreadable, is a failed row with the reason."""
    ids, labels, units, failures = [], [], [], {}
    unit = None
    for row, sample in enumerate(source.samples()):
        ids.append(sample.id)
        if sample.unit != unit:
            units.append(row)
            unit = sample.unit
        if sample.problem:
            failures[row] = sample.problem
            labels.append(UNLABELED)
        elif sample.label is None:
            labels.append(UNLABELED)
        else:
            label = lookup(sample.label)
            if label is None:
                failures[row] = f"label {sample.label!r} is not a class"
            labels.append(UNLABELED if label is None else label)
    return Manifest(split, ids, labels, tuple(units) or (0,), failures, source, 0)


def read_sources(
    data: dict[str, str],
    class_file: Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[Classes, list[Manifest]]:
    """The classes and each split's manifest (in train, val, test order) of named sources."""
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise UserError(f"--data {unknown[0]}=: unknown split; use train, val, test")
    splits = [split for split in SPLITS if split in data]
    sources = {
        split: open_source(os.fspath(data[split]), split, image_column, label_column)
        for split in splits
    }
    for split, source in sources.items():
        if not source.samples():
            raise UserError(f"{data[split]}: no images found for the {split} split")
    if class_file is not None:
        classes = read_class_file(Path(class_file))
    elif "train" in sources:
        classes = classes_of(sources["train"].samples())
        if not classes.wnids:
            raise UserError(f"{data['train']}: no labelled samples to take the classes from")
    else:
        raise UserError("--data: without a train= source, give the classes with --classes")
    lookup = label_index(classes, from_file=class_file is not None)
    return classes, [manifest_of(split, sources[split], lookup) for split in splits]
