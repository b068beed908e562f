"""The lock beside an output (``<out>.lock``): one extract run writes a file at a time.

The lock file holds the writer's pid, so that a reader pointed at a file still being written
can say which process is writing it (`writer_pid`). It is removed when the run ends: a lock
file is re-checked after it is locked, since a run that ends unlinks it, and a second run that
had opened the old file would otherwise hold a lock on a name that no longer exists.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from extract.errors import UserError


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def acquire(out: Path) -> IO[str]:
    """Hold an exclusive lock next to the output so two runs never write the same file."""
    path = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{out}: cannot write here ({error.strerror})") from None
    while True:
        try:
            handle = open(path, "a+")
        except OSError as error:
            raise UserError(f"{out}: cannot write here ({error.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = writer_pid(out)
            writer = f" (pid {pid})" if pid else ""
            raise UserError(f"{out}: another extract run{writer} is writing this file") from None
        if same_file(handle, path):
            break
        handle.close()  # the run before removed it while this one waited: lock the new one
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def release(handle: IO[str], out: Path) -> None:
    """Remove the lock file, then let the lock go: no .lock is left beside a finished output."""
    if same_file(handle, lock_path(out)):
        lock_path(out).unlink(missing_ok=True)
    handle.close()


def writer_pid(out: Path) -> int | None:
    """The pid of another process's run writing `out` now, or None when no run holds its lock
    (or this process does: a run resuming its own file)."""
    try:
        with open(lock_path(out)) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a writer is running
                pid = int(handle.read().strip() or 0)
                return pid if pid and pid != os.getpid() else None
            return None
    except (OSError, ValueError):
        return None
