"""head.train and head.evaluate under faults: SIGKILL while saving, pickled payloads in a
checkpoint, features of another backbone or layer, a checkpoint for another class list."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from test_head import FAST, assert_one_line_error, cli, train_cli

from conftest import extract_features, write_tiny_imagenet
from extract.errors import UserError
from head import checkpoint, evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, weights_file: Path) -> Path:
    data = write_tiny_imagenet(tmp_path_factory.mktemp("faults-data") / "tiny")
    return extract_features(
        data, tmp_path_factory.mktemp("faults") / "f.h5", weights=str(weights_file)
    )


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_everywhere(cached, tmp_path, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    marker = tmp_path / "payload-ran"
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "model" / name, weights_only=True)
        state["extra"] = Payload(marker)
        torch.save(state, tmp_path / "model" / name)
    with pytest.raises(UserError, match="pickled Python objects"):
        checkpoint.load(tmp_path / "model" / "last.pt")
    status, _, err = train_cli(cached, tmp_path / "model", capsys, "--epochs", "2", "--resume")
    assert_one_line_error(status, err, "pickled Python objects")
    status, _, err = cli(evaluate, ["--model", tmp_path / "model", "--features", cached], capsys)
    assert_one_line_error(status, err, "pickled Python objects")
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(tmp_path / "model" / "best.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "attribute, value", [("backbone", "resnet50"), ("node", "avgpool"), ("weights", "random")]
)
def test_a_checkpoint_on_features_of_another_backbone_layer_or_weights_is_refused(
    cached, tmp_path, capsys, attribute, value
):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    other = tmp_path / "other.h5"
    shutil.copy(cached, other)
    with h5py.File(other, "r+") as file:
        file.attrs[attribute] = value
    status, _, err = train_cli(other, tmp_path / "model", capsys, "--epochs", "2", "--resume")
    assert_one_line_error(status, err, str(other), attribute, value, "made differently")
    status, _, err = cli(evaluate, ["--model", tmp_path / "model", "--features", other], capsys)
    assert_one_line_error(status, err, str(other), attribute, value, "made differently")


def test_a_checkpoint_for_another_class_list_is_refused(cached, tmp_path, weights_file, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    others = ("n02124075", "n04067472", "n04540053")  # same count, other wnids
    data = write_tiny_imagenet(tmp_path / "others", wnids=others, names=("a", "b", "c"))
    other = extract_features(data, tmp_path / "others.h5", weights=str(weights_file))
    status, _, err = train_cli(other, tmp_path / "model", capsys, "--epochs", "2", "--resume")
    assert_one_line_error(status, err, "classes that differ")
    status, _, err = cli(evaluate, ["--model", tmp_path / "model", "--features", other], capsys)
    assert_one_line_error(status, err, "classes that differ")


# Runs head.train with torch.save replaced: at epoch 3 the write of last.pt stops half-way,
# flushed to the disk, and the process SIGKILLs itself. With "in-place", checkpoint.save writes
# straight into last.pt instead of beside it (the broken save the test must catch).
KILLED_IN_SAVE = """
import contextlib, io, os, signal, sys
from pathlib import Path
import torch
from extract.errors import run_cli
from head import checkpoint, train

real_save = torch.save

def dying_save(state, stream):
    if state["epoch"] == 3 and Path(stream.name).name.lstrip(".").startswith("last.pt"):
        buffer = io.BytesIO()
        real_save(state, buffer)
        stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        stream.flush()
        os.fsync(stream.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, stream)

torch.save = dying_save
if sys.argv[1] == "in-place":
    checkpoint.atomic_write = contextlib.contextmanager(lambda path: (yield path))
run_cli(train.main, sys.argv[2:])
"""


@pytest.mark.slow
def test_sigkill_inside_the_epoch_3_checkpoint_write_leaves_epoch_2_and_resumes(cached, tmp_path):
    """CPU fp32: killed half-way through writing last.pt at epoch 3, the run leaves last.pt of
    epoch 2 and a loadable best.pt, and --resume continues from there."""

    def killed_run(save: Path, how: str) -> None:
        argv = ["--features", str(cached), "--save", str(save), "--epochs", "5", *FAST]
        done = subprocess.run(
            [sys.executable, "-c", KILLED_IN_SAVE, how, *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == -signal.SIGKILL, done.stderr

    save = tmp_path / "model"
    killed_run(save, "atomic")
    assert checkpoint.load(save / "last.pt").epoch == 2
    assert checkpoint.load(save).epoch in (1, 2, 3)
    status = subprocess.run(
        [sys.executable, "-m", "head.train", "--features", str(cached), "--save", str(save)]
        + ["--epochs", "5", "--resume", *FAST],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert status.returncode == 0, status.stderr
    assert checkpoint.load(save / "last.pt").epoch == 5
    # Negative control: the same kill during an in-place write leaves half a last.pt.
    broken = tmp_path / "in-place"
    killed_run(broken, "in-place")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        checkpoint.load(broken / "last.pt")
