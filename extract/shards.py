"""WebDataset tar shards: members grouped into samples by key, each shard a unit.

A member's key is its name up to the first dot of its file name, and the rest is its extension
(``images/0001.jpg`` -> key ``images/0001``, extension ``jpg``), as WebDataset and img2dataset
write them; consecutive members with one key are one sample. The image is the first ``jpg``,
``jpeg``, ``png`` or ``webp`` member; the label is a ``cls`` member (an integer), else a ``json``
member holding a label (a string, an integer or an object's ``label`` field: img2dataset's
``--save_additional_columns '["label"]'``), else a ``txt`` member (a class name; img2dataset's
caption column). A JSON object without a ``label`` field is metadata, not a label.

Read with the standard library's `tarfile`, not the webdataset package. webdataset streams each
shard (tarfile's ``r|`` mode) and hands samples over as its workers produce them, shards divided
among workers and nodes: an order that is not the manifest's, while resume needs rows in
manifest order (a split's ``next_index`` says every row before it is written). Listing each
shard once with `tarfile` gives every member's offset and size from its header, without reading
image data; a worker then reads one batch (consecutive samples of one shard) with a single read
of the span they occupy, front to back, and never looks a name up. It also spares a dependency
(webdataset needs braceexpand and PyYAML) for the grouping rule above. Shards are plain tar
files: a compressed shard cannot be read at an offset.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence

import numpy as np

from extract.errors import UserError, first_line
from extract.sources import Sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSIONS = ("cls", "json", "txt")  # in order of preference


def key_and_extension(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``); the extension lowercased."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def parse_label(extension: str, data: bytes) -> str | int | None:
    """A label member's value, None for a JSON object without a label (metadata); raises
    ValueError for one that cannot be a label."""
    text = data.decode("utf-8").strip()
    if extension == "cls":
        return int(text)
    if extension == "txt":
        if not text:
            raise ValueError("empty")
        return text
    value = json.loads(text)
    if isinstance(value, dict):
        if "label" not in value:
            return None
        value = value["label"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{str(value)[:40]!r} is not a label (a string or an integer)")
    return value


def sample_label(members: dict[str, tuple[str, bytes]]) -> tuple[str | int | None, str]:
    """(label, problem) from a sample's label members by extension: cls, else a json that
    holds a label, else txt."""
    for extension in LABEL_EXTENSIONS:
        if extension in members:
            name, data = members[extension]
            try:
                label = parse_label(extension, data)
            except (ValueError, UnicodeDecodeError) as error:
                return None, f"label member {name}: {first_line(error)}"
            if label is not None:
                return label, ""
    return None, ""


class TarShards:
    """The samples of tar shards, in shard order and, within one, in the order written."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.listed: list[Sample] | None = None
        self.spans: np.ndarray | None = None  # per sample: shard, image offset, image size
        self.handles: dict[int, int] = {}  # shard -> file descriptor, opened in each process

    def __getstate__(self) -> dict:
        return {**self.__dict__, "handles": {}}  # descriptors do not cross processes

    def samples(self) -> list[Sample]:
        if self.listed is None:
            listed, spans = [], []
            for unit, shard in enumerate(self.shards):
                for sample, span in list_shard(shard, unit):
                    listed.append(sample)
                    spans.append(span)
            self.listed = listed
            self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
        return self.listed

    def read(self, numbers: Sequence[int]) -> list[tuple[str, bytearray | Exception]]:
        """One read of the span from the first image to the end of the last; a sample's image
        is then a slice of it. The numbers are consecutive samples of one shard."""
        self.samples()
        spans = self.spans[list(numbers)]
        read: list[tuple[str, bytearray | Exception]] = []
        if not len(spans):
            return read
        shard = int(spans[0, 0])
        start = int(spans[:, 1].min())
        stop = int((spans[:, 1] + spans[:, 2]).max())
        try:
            if shard not in self.handles:
                self.handles[shard] = os.open(self.shards[shard], os.O_RDONLY)
            block = os.pread(self.handles[shard], stop - start, start)
            error = None
        except OSError as failed:
            block, error = b"", failed
        for number, (_, offset, size) in zip(numbers, spans):
            name = self.listed[number].id
            begin = int(offset) - start
            if error is not None:
                read.append((name, error))
            elif begin + size > len(block):
                read.append((name, OSError(f"{self.shards[shard]}: ends inside this image")))
            else:
                read.append((name, bytearray(block[begin : begin + int(size)])))
        return read

    def __del__(self) -> None:
        for handle in self.handles.values():
            os.close(handle)


def list_shard(shard: str, unit: int) -> list[tuple[Sample, tuple[int, int, int]]]:
    """A shard's samples and where each image lies, from its headers and label members.

    A truncated shard keeps the samples before the cut; a sample the cut goes through, with no
    image, no label or a label that does not parse is listed with the reason.
    """
    size = os.path.getsize(shard)
    found: list[tuple[Sample, tuple[int, int, int]]] = []
    current: dict | None = None
    problem = ""

    def finish(pending: dict) -> None:
        label, why = sample_label(pending["labels"])
        why = pending["problem"] or why
        if not why and pending["image"] is None:
            why = f"no image member ({', '.join(IMAGE_EXTENSIONS)})"
        if not why and label is None:
            why = f"no label member ({', '.join(LABEL_EXTENSIONS)})"
        span = pending["image"] or (0, 0)
        sample = Sample(f"{shard}:{pending['key']}", label, unit, why)
        found.append((sample, (unit, *span)))

    with open(shard, "rb") as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:")
        except tarfile.ReadError as error:
            if size == 0 or "empty file" in str(error):
                return []
            raise UserError(
                f"{shard}: not an uncompressed tar file ({first_line(error)})"
            ) from None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = key_and_extension(member.name)
                if current is None or current["key"] != key:
                    if current is not None:
                        finish(current)
                    current = {"key": key, "image": None, "labels": {}, "problem": ""}
                cut = member.offset_data + member.size > size
                if cut:
                    current["problem"] = f"the shard ends inside {member.name} (truncated)"
                elif extension in IMAGE_EXTENSIONS and current["image"] is None:
                    current["image"] = (member.offset_data, member.size)
                elif extension in LABEL_EXTENSIONS and extension not in current["labels"]:
                    data = tar.extractfile(member).read()
                    current["labels"][extension] = (member.name, data)
                tar.members = []  # headers already used; a large shard keeps none
        except tarfile.TarError as error:
            problem = f"the shard is truncated ({first_line(error)})"
        if current is not None:
            if problem and not current["problem"]:
                current["problem"] = problem
            finish(current)
    return found
