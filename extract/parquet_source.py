"""Parquet files with the image bytes in a column, as Hugging Face datasets store them.

The image column holds the encoded bytes, or a struct with a ``bytes`` field (a Hugging Face
`Image` feature: ``{"bytes", "path"}``); the label column an integer (a ClassLabel's index) or
a class name. Each row group is a unit: a batch's rows lie in one, and a worker reads the image
column a row group at a time, keeping only the one it is in. Memory therefore stays at a row
group per worker whatever the size of the files; the listing reads only the label column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extract.errors import UserError, first_line
from extract.sources import Sample


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: not a readable Parquet file ({first_line(error)})") from None


def is_image_column(kind: pa.DataType) -> bool:
    """Raw bytes, or a struct with a binary ``bytes`` field."""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and is_image_column(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def as_label(value) -> str | int | None:
    """A label cell as a class name or index; integral floats (a column with nulls written by
    pandas) count as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class ParquetFiles:
    """The rows of Parquet files, in file order, then row order."""

    def __init__(self, files: list[str], image_column: str, label_column: str):
        self.files = files
        self.image_column = image_column
        self.label_column = label_column
        for path in files:
            schema = open_parquet(path).schema_arrow
            for name, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
                if name not in schema.names:
                    raise UserError(
                        f"{path}: no column {name!r} (has {', '.join(schema.names)}; "
                        f"{flag} names it)"
                    )
            if not is_image_column(schema.field(image_column).type):
                raise UserError(
                    f"{path}: column {image_column!r} holds {schema.field(image_column).type}, "
                    f"not image bytes (binary, or a struct with a 'bytes' field)"
                )
        self.listed: list[Sample] | None = None
        self.places: np.ndarray | None = None  # per sample: file, row group, row in it
        self.cached: tuple[tuple[int, int], pa.Array] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cached": None}

    def samples(self) -> list[Sample]:
        if self.listed is None:
            listed, places, unit = [], [], 0
            for number, path in enumerate(self.files):
                file = open_parquet(path)
                row = 0
                for group in range(file.num_row_groups):
                    labels = file.read_row_group(group, columns=[self.label_column])
                    for offset, value in enumerate(labels.column(0).to_pylist()):
                        label = as_label(value)
                        why = "" if label is not None else f"no label ({value!r})"
                        listed.append(Sample(f"{path}:{row}", label, unit, why))
                        places.append((number, group, offset))
                        row += 1
                    unit += 1
            self.listed = listed
            self.places = np.asarray(places, dtype=np.int64).reshape(-1, 3)
        return self.listed

    def images(self, file: int, group: int) -> pa.Array:
        """The image column's bytes of one row group, the last one read kept."""
        if self.cached is None or self.cached[0] != (file, group):
            self.cached = None  # let the previous row group go before reading the next
            table = open_parquet(self.files[file]).read_row_group(
                group, columns=[self.image_column]
            )
            column = table.column(0).combine_chunks()
            if pa.types.is_struct(column.type):
                column = column.field("bytes")
            self.cached = ((file, group), column)
        return self.cached[1]

    def read(self, numbers: Sequence[int]) -> list[tuple[str, bytearray | Exception]]:
        self.samples()
        read: list[tuple[str, bytearray | Exception]] = []
        for number in numbers:
            name = self.listed[number].id
            file, group, offset = (int(n) for n in self.places[number])
            try:
                value = self.images(file, group)[offset].as_py()
            except (OSError, pa.ArrowException) as error:
                read.append((name, OSError(f"{self.files[file]}: {first_line(error)}")))
                continue
            if value is None:
                read.append((name, ValueError("no image bytes in this row")))
            else:
                read.append((name, bytearray(value)))
        return read
