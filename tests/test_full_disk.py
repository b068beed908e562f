"""A real full disk: a small tmpfs mounted by the test and filled by another program while
extract writes features and while head.train saves its checkpoints.

Mounting needs root (CI runs as root); elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, extract_features, write_tiny_imagenet
from extract import store
from head import checkpoint
from head.train import main as train_main

DISK_SIZE = "16m"

# Another program: writes zeros to argv[1] until the disk has not one byte left.
FILL = """
import errno, sys
with open(sys.argv[1], "wb", buffering=0) as stream:
    block = bytes(1 << 16)
    while block:
        try:
            stream.write(block)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            block = block[: len(block) // 2]
"""

# `python -m extract` with the disk filled, by the program above, right after the room for the
# first val batch was made sure of and before that batch is written. argv[1]: the filler file.
EXTRACT_THEN_FILL = f"""
import subprocess, sys
from extract import store
from extract.__main__ import main
from extract.errors import run_cli

filler, write_rows = sys.argv.pop(1), store.write_rows

def fill_then_write(group, *args):
    if group.name == "/val" and int(group.attrs["rows"]) == 0:
        subprocess.run([sys.executable, "-c", {FILL!r}, filler], check=True)
    return write_rows(group, *args)

store.write_rows = fill_then_write
run_cli(main, sys.argv[1:])
"""

# `python -m head.train` with the disk filled just before epoch 3 is saved.
TRAIN_THEN_FILL = f"""
import subprocess, sys
from extract.errors import run_cli
from head import training
from head.train import main

filler, save = sys.argv.pop(1), training.save

def fill_then_save(run, *args):
    if run.epoch == 3:
        subprocess.run([sys.executable, "-c", {FILL!r}, filler], check=True)
    return save(run, *args)

training.save = fill_then_save
run_cli(main, sys.argv[1:])
"""


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs mounted for this test alone, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_extract_on_a_disk_that_fills_keeps_its_rows_and_resume_completes(
    small_disk, tmp_path, weights_file
):
    """The disk fills between the room check and the write of a batch. The blocks of that
    write were reserved by the check, so it completes; the next batch's reservation meets the
    real ENOSPC before HDF5 writes anything (a write failing half-way would leave HDF5's
    bookkeeping stale and the file unreadable). One line, exit 2, every committed row as the
    uninterrupted run has it, nothing complete; once the space is freed, --resume finishes."""
    data = write_tiny_imagenet(tmp_path / "data")
    reference = extract_features(
        data, tmp_path / "reference.h5", weights=str(weights_file), batch_size=2
    )
    out, filler = small_disk / "f.h5", small_disk / "filler"
    common = ["--data", str(data), "--out", str(out), "--weights", str(weights_file)]
    common += ["--workers", "0", "--batch-size", "2", "--no-progress", "--device", "cpu"]

    full = python("-c", EXTRACT_THEN_FILL, str(filler), *common)
    assert_one_line(full, f"{store.part_path(out)}: writing failed", "No space left on device")
    assert os.statvfs(small_disk).f_bavail == 0, "the disk is full"
    assert not out.exists(), "nothing may claim to be complete"
    with h5py.File(store.part_path(out)) as part, h5py.File(reference) as expected:
        assert not part.attrs["complete"]
        assert part["train"].attrs["rows"] == 12
        assert 0 < part["val"].attrs["rows"] < 6, "stopped half-way through val"
        for split in ("train", "val"):
            rows = part[split].attrs["rows"]
            for name in ("features", "labels", "paths"):
                np.testing.assert_array_equal(
                    part[split][name][:rows], expected[split][name][:rows]
                )

    filler.unlink()
    resumed = python("-m", "extract", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(out) as got, h5py.File(reference) as expected:
        assert got.attrs["complete"]
        for split in ("train", "val"):
            for name in ("features", "labels", "paths", "failed"):
                np.testing.assert_array_equal(got[split][name][()], expected[split][name][()])


def test_head_train_on_a_disk_that_fills_keeps_last_and_best_and_resume_completes(
    small_disk, tmp_path, features_file
):
    """Saving epoch 3 meets a full disk: one line, exit 2, and last.pt and best.pt still load
    and hold what a run of 2 epochs saves; once the space is freed, --resume ends where an
    uninterrupted run of 5 epochs does."""
    options = ["--features", str(features_file), "--batch-size", "5", "--no-progress"]
    for epochs in ("2", "5"):
        assert train_main([*options, "--save", str(tmp_path / epochs), "--epochs", epochs]) == 0
    save, filler = small_disk / "model", small_disk / "filler"

    full = python(
        "-c", TRAIN_THEN_FILL, str(filler), *options, "--save", str(save), "--epochs", "5"
    )
    assert_one_line(full, f"{save}: cannot save epoch 3", "No space left on device")
    for name in (checkpoint.LAST, checkpoint.BEST):
        state, expected = checkpoint.load(save / name), checkpoint.load(tmp_path / "2" / name)
        assert state.epoch == expected.epoch
        torch.testing.assert_close(state.layer, expected.layer, rtol=0, atol=0)
    assert not [path.name for path in save.iterdir() if path.name.endswith(".tmp")]

    filler.unlink()
    resumed = python("-m", "head.train", *options, "--save", str(save), "--epochs", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 3/5" in resumed.stdout and "epoch 2/5" not in resumed.stdout
    state, expected = checkpoint.load(save / "last.pt"), checkpoint.load(tmp_path / "5" / "last.pt")
    torch.testing.assert_close(state.layer, expected.layer, rtol=0, atol=1e-6)
    assert state.best_epoch == expected.best_epoch
