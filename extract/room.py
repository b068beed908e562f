"""Room for the next write into the feature file, and quiet after one that failed anyway.

HDF5 cannot recover from a write that fails half-way, so `extract.store` reserves the disk
blocks a batch may use before writing it (`check_room`), and a batch that finds no room
(`NoRoom`) leaves the file as it was after the batch before. When a write fails all the same,
HDF5's complaints about each handle it then cannot release are silenced
(`handle_release_errors_silenced`): the one error raised says it all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import h5py

# What posix_fallocate answers on a file system that cannot reserve blocks (some network and
# FUSE file systems): not a full disk.
CANNOT_RESERVE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class NoRoom(OSError):
    """No room on the disk, or under the file-size limit, for the next write; nothing of it
    was written, so the file is as consistent as after the batch before."""


@contextlib.contextmanager
def handle_release_errors_silenced() -> Iterator[None]:
    """After a failed write HDF5 also fails to release each open handle, and h5py prints each
    failure with a traceback (through both sys hooks) as the handles go, before the error
    reaches us; the one error raised says it all. Both hooks are back as they were on leaving."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def is_release_error(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and "decrement id ref count" in str(error)

    def quiet_excepthook(kind, error, traceback) -> None:
        if not is_release_error(error):
            excepthook(kind, error, traceback)

    def quiet_unraisablehook(unraisable) -> None:
        if not is_release_error(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def check_room(file: h5py.File, needed: int) -> None:
    """Make sure the next write fits, before HDF5 starts it.

    HDF5 cannot recover from a write that fails half-way (its bookkeeping in the file goes
    stale), so room under the process's file-size limit is checked, and the disk blocks the
    write may use are reserved (`posix_fallocate`): from the end of HDF5's allocated space,
    where it allocates next, back over its recent allocations, whose unwritten tails it may
    fill, and on by a margin. Another program filling the disk meanwhile cannot take them.
    When they cannot be had nothing has been written, and --resume continues once there is
    space. Where blocks cannot be reserved (no `posix_fallocate`, or a file system that does not
    support it), the free space is read instead.
    """
    margin = needed * 2 + 2**20
    path = Path(file.filename)
    end = file.id.get_filesize()  # HDF5's end of allocated space; the file may be longer
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and end + margin > limit:
        raise NoRoom(f"no room for the next {needed} bytes: file size limit of {limit} bytes")
    if hasattr(os, "posix_fallocate"):
        start = max(0, end - margin)
        with open(path, "r+b") as stream:
            try:
                os.posix_fallocate(stream.fileno(), start, end + margin - start)
                return
            except OSError as error:
                if error.errno not in CANNOT_RESERVE:
                    raise NoRoom(f"no room for the next {needed} bytes: {error.strerror}") from None
    if shutil.disk_usage(path.parent).free < margin:
        raise NoRoom(f"no room for the next {needed} bytes: disk full")
