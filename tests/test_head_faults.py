"""head.train and head.evaluate under faults: SIGKILL while saving, pickled payloads in a
checkpoint, features of another backbone or layer, a checkpoint for another class list."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_last_and_best_loadable(cached, tmp_path):
    save = tmp_path / "model"
    command = [
        sys.executable,
        "-m",
        "head.train",
        "--features",
        str(cached),
        "--save",
        str(save),
        "--epochs",
        "100000",
        *FAST,
    ]
    rng = random.Random(0)
    for attempt in range(4):
        process = subprocess.Popen(
            command + (["--resume"] if attempt else []),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while not ((save / "last.pt").exists() and (save / "best.pt").exists()):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # many epochs, each saving, go by meanwhile
        process.send_signal(signal.SIGKILL)
        process.wait()
        for name in ("last.pt", "best.pt"):
            state = torch.load(save / name, weights_only=True)
            assert state["epoch"] >= 1 and set(state["state_dict"]) == {"weight", "bias"}
        checkpoint.load(save)
    assert torch.load(save / "last.pt", weights_only=True)["epoch"] > 4
