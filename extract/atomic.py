"""Writing a file so that a crash at any moment leaves the previous file or the new one, never
half of one: the checkpoints, the history table and the empty feature file all go this way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends, the file is
    fsynced and renamed over `path`; when it raises (Ctrl-C included), it is removed.

    The temporary name is fixed (`.NAME.tmp`), so a writer killed outright leaves at most one
    stray file, which the next write of `path` replaces.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
