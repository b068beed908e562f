"""The command line: clear one-line errors with exit 2, resume after SIGKILL, no overwrites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import extract_features
from extract import __main__ as cli
from extract import store
from extract.errors import run_cli
from extract.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        run_cli(cli.main, argv)
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_and_empty_data_folder(tmp_path, capsys):
    code, _, err = run_main(
        ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "f.h5")], capsys
    )
    assert_one_line_error(code, err, "nope", "not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(
        ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "f.h5")], capsys
    )
    assert_one_line_error(code, err, "empty")


def test_no_wnids_and_no_train_folders(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("hello")
    code, _, err = run_main(
        ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "f.h5")], capsys
    )
    assert_one_line_error(code, err, "no classes found")


def test_val_annotation_with_unknown_wnid(tiny_imagenet, tmp_path, capsys):
    annotations = tiny_imagenet / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[0] = lines[0].replace("n01443537", "n00000000")
    annotations.write_text("\n".join(lines) + "\n")
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(tmp_path / "f.h5"), "--weights", "random"],
        capsys,
    )
    assert_one_line_error(code, err, "val_annotations.txt", "n00000000")


def test_unwritable_output(tiny_imagenet, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(blocker / "f.h5"), "--weights", "random"],
        capsys,
    )
    assert_one_line_error(code, err, "cannot write")


@pytest.mark.parametrize("content", [b"garbage bytes", "wrong keys"])
def test_bad_weights_file(tiny_imagenet, tmp_path, capsys, content):
    weights = tmp_path / "w.pth"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(tmp_path / "f.h5"), "--weights", str(weights)],
        capsys,
    )
    assert_one_line_error(code, err, str(weights))
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tiny_imagenet, tmp_path, capsys):
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(tmp_path / "f.h5"), "--device", "cuda"], capsys
    )
    assert_one_line_error(code, err, "CUDA")


def test_complete_file_is_not_overwritten_without_overwrite(tiny_imagenet, tmp_path, capsys):
    out = extract_features(tiny_imagenet, tmp_path / "f.h5")
    before = out.read_bytes()
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(out), "--weights", "random"], capsys
    )
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == before
    code, out_text, _ = run_main(
        [
            "--data",
            str(tiny_imagenet),
            "--out",
            str(out),
            "--overwrite",
            "--weights",
            "random",
            "--workers",
            "0",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and "extracted 18 images, 0 failed" in out_text


def test_summary_line_and_progress_bar(tiny_imagenet, tmp_path, capsys):
    code, out, err = run_main(
        [
            "--data",
            str(tiny_imagenet),
            "--out",
            str(tmp_path / "f.h5"),
            "--weights",
            "random",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0
    assert "img/s" in err and "100%" in err
    assert "extracted 18 images, 0 failed" in out and "images/s" in out and "MB" in out


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "extract", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def rows_written(part: Path) -> int:
    """Rows committed in an interrupted file; opened without HDF5 locking, read only.

    h5py directly, not extract.store: the writer still holds the file, which store's readers
    (with HDF5's locking) would refuse; the test reads the raw progress counters."""
    with h5py.File(part, "r", locking=False) as file:
        return sum(int(file[s].attrs["next_index"]) for s in store.splits(file))


def rows_written_so_far(part: Path) -> int:
    """`rows_written` while the writer runs: a read racing a flush may see a file mid-update."""
    try:
        return rows_written(part) if part.exists() else 0
    except (OSError, KeyError):
        return 0


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_imagenet, tmp_path, weights_file):
    from conftest import write_tiny_imagenet

    data = write_tiny_imagenet(tmp_path / "bigger", train_per_class=12, val_per_class=4)
    common = [
        "--data",
        str(data),
        "--weights",
        str(weights_file),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--store-dtype",
        "float32",
        "--device",
        "cpu",  # as the reference it is compared with, bit for bit
    ]
    reference = tmp_path / "reference.h5"
    extract_features(
        data, reference, weights=str(weights_file), store_dtype="float32", batch_size=2
    )

    out = tmp_path / "killed.h5"
    part = store.part_path(out)
    process = start_cli([*common, "--out", str(out)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if rows_written_so_far(part) >= 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "an interrupted run must never appear under the final name"
    done = rows_written(part)
    assert 0 < done < 48

    resumed = start_cli([*common, "--out", str(out), "--resume", "--no-progress"])
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()
    assert f"extracted {48 - done} images" in stdout.decode(), "only the rest is recomputed"
    with h5py.File(out) as got, h5py.File(reference) as expected:
        assert bool(got.attrs["complete"])
        for split in ("train", "val"):
            for name in ("features", "labels", "paths"):
                np.testing.assert_array_equal(got[split][name][()], expected[split][name][()])


def test_resume_refuses_other_weights_or_images(tiny_imagenet, tmp_path, weights_file, capsys):
    out = tmp_path / "f.h5"
    part = store.part_path(out)
    extract_features(tiny_imagenet, part.with_name("seed.h5"), weights=str(weights_file))
    part.with_name("seed.h5").rename(part)  # a stand-in for an interrupted run
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(out), "--resume", "--weights", "random"], capsys
    )
    assert_one_line_error(code, err, "cannot resume", "weights_sha256")
    (tiny_imagenet / "train/n01443537/images/n01443537_0.JPEG").unlink()
    code, _, err = run_main(
        [
            "--data",
            str(tiny_imagenet),
            "--out",
            str(out),
            "--resume",
            "--weights",
            str(weights_file),
        ],
        capsys,
    )
    assert_one_line_error(code, err, "cannot resume", "train images differ")


def test_recorded_preprocessing_is_canonical_json():
    """Sorted keys: the same parameters always give the same text, which --resume compares."""
    text = Preprocess(resize_size=160, crop_size=128).to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True)
    assert Preprocess.from_json(text) == Preprocess(resize_size=160, crop_size=128)


def test_resume_refuses_other_preprocessing(tiny_imagenet, tmp_path, weights_file, capsys):
    """An interrupted file made with another resize is refused; the same file with the
    preprocessing of this run resumes (so the refusal is the preprocessing's alone)."""
    out = tmp_path / "f.h5"
    part = store.part_path(out)
    extract_features(tiny_imagenet, part.with_name("seed.h5"), weights=str(weights_file))
    part.with_name("seed.h5").rename(part)  # a stand-in for an interrupted run
    with h5py.File(part, "r+") as file:
        file.attrs["complete"] = False
        recorded = str(file.attrs["preprocess"])
        other = json.loads(recorded)
        other["resize_size"] = 224
        file.attrs["preprocess"] = json.dumps(other, sort_keys=True)
    argv = ["--data", str(tiny_imagenet), "--out", str(out), "--resume", "--no-progress"]
    argv += ["--weights", str(weights_file), "--workers", "0"]
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "cannot resume", "preprocess", "224")
    assert part.exists() and not out.exists()

    with h5py.File(part, "r+") as file:
        file.attrs["preprocess"] = recorded
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0 and "extracted 0 images" in stdout and out.exists()


def test_interrupted_run_needs_resume_or_overwrite(tiny_imagenet, tmp_path, capsys):
    out = tmp_path / "f.h5"
    store.part_path(out).write_bytes(b"partial")
    code, _, err = run_main(
        ["--data", str(tiny_imagenet), "--out", str(out), "--weights", "random"], capsys
    )
    assert_one_line_error(code, err, "interrupted run", "--resume")


def test_cli_exit_status_and_help():
    process = subprocess.run(
        [sys.executable, "-m", "extract", "--data", "/nonexistent", "--out", "/tmp/x.h5"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == "error: /nonexistent: data folder not found"
    help_text = subprocess.run(
        [sys.executable, "-m", "extract", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert "Examples:" in help_text and "--resume" in help_text


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments_then_resume_matches(tmp_path, weights_file):
    """Kill at random moments, resume each time: rounds alternate between a random time after
    the start (start-up, model loading or mid-run) and a random moment after the run has
    committed a few more rows (mid-batch or mid-flush). At least 3 rounds must land mid-run
    with rows committed in that round, or the test would compare two clean runs."""
    import random

    from conftest import write_tiny_imagenet

    data = write_tiny_imagenet(tmp_path / "data", train_per_class=16, val_per_class=4)
    total = 60
    common = [
        "--data",
        str(data),
        "--weights",
        str(weights_file),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--resume",
        "--device",
        "cpu",  # as the reference it is compared with, bit for bit
    ]
    out = tmp_path / "killed.h5"
    part = store.part_path(out)
    moments = random.Random(7)
    mid_run_kills = 0
    for round_number in range(8):
        before = rows_written_so_far(part)
        process = start_cli([*common, "--out", str(out)])
        if round_number % 2 == 0:
            wait_until = time.monotonic() + moments.uniform(0.5, 6.0)
        else:
            target = min(before + moments.randint(2, 8), total - 16)
            deadline = time.monotonic() + 120
            while rows_written_so_far(part) < target and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            wait_until = time.monotonic() + moments.uniform(0.0, 0.2)
        while time.monotonic() < wait_until and process.poll() is None:
            time.sleep(0.01)
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read().decode()
            break  # finished before the kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not out.exists(), "a killed run never appears under the final name"
        if rows_written_so_far(part) > before:
            mid_run_kills += 1
    assert mid_run_kills >= 3, f"only {mid_run_kills} kills landed mid-run with rows committed"
    final = start_cli([*common, "--out", str(out)])
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr.decode()
    reference = extract_features(
        data, tmp_path / "reference.h5", weights=str(weights_file), batch_size=2
    )
    with h5py.File(out) as got, h5py.File(reference) as expected:
        for split in ("train", "val"):
            for name in ("features", "labels", "paths", "failed"):
                np.testing.assert_array_equal(got[split][name][()], expected[split][name][()])
