"""How expected problems are worded, and what a failed write leaves behind in the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from extract.errors import MESSAGE_LIMIT, first_line

ROOT = Path(__file__).resolve().parent.parent

# Appends batches to a feature-shaped HDF5 file on the (tiny) disk given as argv[1] until the
# disk is full, with the room pre-check turned off so the write itself fails half-way (ENOSPC).
# argv[2] == "loud" turns the silencing off: the negative control.
FILL_THE_DISK = """
import sys
import numpy as np
import h5py
from pathlib import Path
from extract import store

store.check_room = lambda path, needed: None
if sys.argv[2] == "loud":
    import contextlib
    store.handle_release_errors_silenced = contextlib.nullcontext
hooks = (sys.excepthook, sys.unraisablehook)
file = h5py.File(Path(sys.argv[1]) / "features.h5.part", "w")
group = file.create_group("train")
for name, shape, dtype in [
    ("features", (0, 4096), "float16"),
    ("labels", (0,), "int64"),
    ("paths", (0,), store.STRING),
    ("failed", (0, 2), store.STRING),
]:
    chunks = (store.CHUNK_ROWS,) + shape[1:]
    group.create_dataset(name, shape, maxshape=(None,) + shape[1:], chunks=chunks, dtype=dtype)
group.attrs.update(rows=0, failed_count=0, next_index=0)
rows = np.ones((store.CHUNK_ROWS, 4096), np.float16)
try:
    for batch in range(1000):
        store.append(group, rows, None, [0] * len(rows), ["a.JPEG"] * len(rows), [], batch)
except OSError as error:
    print(f"write failed: {error}", file=sys.stderr, flush=True)
print(f"hooks restored: {(sys.excepthook, sys.unraisablehook) == hooks}", flush=True)
"""


def test_a_library_error_is_quoted_as_its_first_line_cut_to_the_limit():
    error = OSError("x" * (3 * MESSAGE_LIMIT) + "\nsecond line of a long library message")
    assert first_line(error) == "x" * MESSAGE_LIMIT
    assert first_line(RuntimeError("short\nmore")) == "short"
    assert first_line(KeyError()) == "KeyError"


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs, so a write really fails with ENOSPC (needs root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", FILL_THE_DISK, str(disk), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_write_failing_on_a_full_disk_stays_quiet_and_restores_the_sys_hooks(tiny_disk):
    quiet = fill(tiny_disk, "quiet")
    assert "write failed:" in quiet.stderr, quiet.stderr
    assert "decrement id ref count" not in quiet.stderr, quiet.stderr
    assert "Traceback" not in quiet.stderr, quiet.stderr
    assert "hooks restored: True" in quiet.stdout, quiet.stdout

    (tiny_disk / "features.h5.part").unlink()
    loud = fill(tiny_disk, "loud")  # without the silencing, HDF5's release errors do show
    assert "write failed:" in loud.stderr, loud.stderr
    assert "decrement id ref count" in loud.stderr, loud.stderr
