"""head.train and head.evaluate: outputs, resume, selection, fc8 init, standardisation, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tqdm import tqdm

from conftest import WNIDS, extract_features, write_tiny_imagenet
from extract import store
from extract.backbone import load_network
from extract.errors import UserError, run_cli
from extract.provenance import PROVENANCE_KEYS
from head import checkpoint, evaluate, evaluation, features, train, training
from head.model import classifier_head, imagenet_wnids, initial_head, pretrained_classifier_head
from head.step import epoch_order

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "5", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("head-data") / "tiny")


@pytest.fixture(scope="module")
def cached(dataset: Path, tmp_path_factory, weights_file: Path) -> Path:
    """float16 features of train, val and test, with flipped views, random-init weights."""
    return extract_features(
        dataset,
        tmp_path_factory.mktemp("head-features") / "f.h5",
        splits=["train", "val", "test"],
        flip=True,
        weights=str(weights_file),
    )


def cli(command, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command's main through run_cli as `python -m` would; returns (status, out, err)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command.main, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def train_cli(features_file: Path, save: Path, capsys, *extra) -> tuple[int, str, str]:
    return cli(train, ["--features", features_file, "--save", save, *FAST, *extra], capsys)


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_training_writes_the_checkpoint_contract_history_and_plots(cached, tmp_path, capsys):
    status, out, _ = train_cli(cached, tmp_path / "model", capsys, "--epochs", "2")
    assert status == 0
    assert "MiB in memory" in out
    assert [line for line in out.splitlines() if line.startswith("epoch ")][1].startswith(
        "epoch 2/2  train loss "
    )
    for name in ("last.pt", "best.pt", "history.csv", "loss.png", "accuracy.png", "time.png"):
        assert (tmp_path / "model" / name).stat().st_size > 0
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    # Every entry round-trips through the checkpoint's one reader and writer.
    assert checkpoint.Checkpoint.from_dict(state, "last.pt").to_dict().keys() == state.keys()
    assert set(state["state_dict"]) == {"weight", "bias"}
    assert state["state_dict"]["weight"].shape == (3, 4096)
    assert state["state_dict"]["bias"].shape == (3,)
    assert state["epoch"] == 2
    assert state["numeric_class_names"] == list(WNIDS)
    assert state["tiny_class"]["n01443537"] == "goldfish"
    with store.open_complete(cached) as file:
        assert state["features"] == store.provenance(file)
    for key in ("train_loss", "validation_loss", "train_accuracy", "validation_accuracy", "time"):
        assert len(state[key]) == 2
    with open(tmp_path / "model" / "history.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert float(rows[1]["val_top1"]) == pytest.approx(state["validation_accuracy"][1])


def test_resume_after_three_epochs_matches_six_straight(cached, tmp_path, capsys):
    options = ("--flip", "--standardize", "--weight-decay", "0.01")
    assert train_cli(cached, tmp_path / "straight", capsys, "--epochs", "6", *options)[0] == 0
    assert train_cli(cached, tmp_path / "split", capsys, "--epochs", "3", *options)[0] == 0
    status, out, _ = train_cli(
        cached, tmp_path / "split", capsys, "--epochs", "6", "--resume", *options
    )
    assert status == 0 and "epoch 4/6" in out and "epoch 1/6" not in out
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            resumed["state_dict"][name], straight["state_dict"][name], rtol=0, atol=1e-6
        )
    for key in (
        "train_loss",
        "validation_loss",
        "train_accuracy",
        "validation_accuracy",
        "history_epochs",
    ):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6)
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["best_accuracy"] == straight["best_accuracy"]


@pytest.mark.parametrize("standardized", [False, True])
def test_an_epoch_reports_the_loss_and_top1_of_its_head_over_every_row(standardized):
    """With lr 0 the head stays as it is, so an epoch's loss and top-1 are that head's over all
    rows: 30 rows in batches of 7 (a short last one), weighted by size, standardised when the
    run is. The bf16 epoch takes the bf16 path: near, but not equal."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 16, generator=generator).relu() * 3
    labels = torch.randint(0, 5, (30,), generator=generator)
    train_split = features.SplitTensors("train", rows.half(), labels)
    mean, std = (rows.mean(0), rows.std(0) + 0.5) if standardized else (None, None)
    epoch = {}
    for precision in ("fp32", "bf16"):
        settings = training.Settings(batch_size=7, lr=0.0, precision=precision, progress=False)
        head = initial_head(16, 5, seed=0)
        run = training.Run(head, training.adam(head, settings), torch.Generator(), mean, std)
        with tqdm(disable=True) as bar:
            epoch[precision] = training.train_epoch(run, train_split, settings, bar)
    inputs = rows.half().float()
    if standardized:
        inputs = (inputs - mean) / std
    logits = torch.nn.functional.linear(inputs, head.weight.detach(), head.bias.detach())
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert epoch["fp32"].loss == pytest.approx(loss, rel=1e-6)
    assert epoch["fp32"].top1 == pytest.approx(100 * (logits.argmax(1) == labels).sum() / 30)
    assert epoch["bf16"].loss != epoch["fp32"].loss
    assert epoch["bf16"].loss == pytest.approx(loss, rel=0.02)


def test_bf16_training_follows_fp32_closely_and_resumes_exactly(cached, tmp_path, capsys):
    """bf16 matmuls change the steps a little (so the weights differ) but not the result."""
    for name, extra in (("fp32", ()), ("bf16", ("--precision", "bf16"))):
        assert train_cli(cached, tmp_path / name, capsys, "--epochs", "6", *extra)[0] == 0
    assert (
        train_cli(cached, tmp_path / "split", capsys, "--epochs", "3", "--precision", "bf16")[0]
        == 0
    )
    assert (
        train_cli(
            cached, tmp_path / "split", capsys, "--epochs", "6", "--precision", "bf16", "--resume"
        )[0]
        == 0
    )
    fp32, bf16, split = (
        torch.load(tmp_path / name / "last.pt", weights_only=True)
        for name in ("fp32", "bf16", "split")
    )
    weight, reference = bf16["state_dict"]["weight"], fp32["state_dict"]["weight"]
    assert not torch.equal(weight, reference), "the bf16 path was not taken"
    assert (
        torch.nn.functional.cosine_similarity(weight.flatten(), reference.flatten(), dim=0) > 0.99
    )
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
    assert abs(bf16["validation_accuracy"][-1] - fp32["validation_accuracy"][-1]) <= 10
    torch.testing.assert_close(split["state_dict"], bf16["state_dict"], rtol=0, atol=1e-6)
    assert bf16["state_dict"]["weight"].dtype == torch.float32


def test_best_accuracy_is_what_evaluate_recomputes_from_best_pt(cached, tmp_path, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "4", "--standardize")[0] == 0
    status, out, _ = cli(evaluate, ["--model", tmp_path / "model", "--features", cached], capsys)
    assert status == 0 and out.startswith("val: 6 images  top1 ")
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    best = torch.load(tmp_path / "model" / "best.pt", weights_only=True)
    assert report["top1"] == best["best_accuracy"]
    assert report["epoch"] == best["best_epoch"]
    assert best["best_accuracy"] == max(best["validation_accuracy"])
    assert (tmp_path / "model" / "confusion.png").stat().st_size > 0
    with open(tmp_path / "model" / "per_class.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["wnid"] for row in rows] == list(WNIDS)
    assert sum(int(row["images"]) for row in rows) == 6


def test_evaluate_metrics_match_a_direct_computation():
    labels = np.array([0, 1, 2, 2, 1, 0, 3, 3])
    logits = np.random.default_rng(0).normal(size=(8, 7))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    result = evaluation.metrics(probabilities, predicted, labels)
    assert result["top1"] == pytest.approx(100 * np.mean(predicted == labels))
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert result["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    assert result["mean_per_class_accuracy"] == pytest.approx(100 * np.mean(recalls))


def test_expected_calibration_error_of_known_cases():
    # Confident (0.9) and right 9 times out of 10: perfectly calibrated.
    calibrated = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 9 + [1])
    assert evaluation.expected_calibration_error(calibrated, labels) == pytest.approx(0.0)
    # Always 0.8 confident, always wrong: the error is the confidence.
    assert evaluation.expected_calibration_error(
        np.tile([0.8, 0.2], (4, 1)), np.ones(4, int)
    ) == pytest.approx(0.8)


def test_standardize_folds_the_statistics_into_the_saved_layer(cached, tmp_path, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "2", "--standardize")[0] == 0
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    with store.open_complete(cached) as file:
        raw = torch.from_numpy(store.read_split(file, "val").features).float()
    mean, std = state["standardization"]["mean"], state["standardization"]["std"]
    trained = torch.nn.functional.linear(
        (raw - mean) / std, state["trainable"]["weight"], state["trainable"]["bias"]
    )
    exported = torch.nn.functional.linear(
        raw, state["state_dict"]["weight"], state["state_dict"]["bias"]
    )
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)
    train_features = features.load(cached, report=lambda line: None).train.features.double()
    torch.testing.assert_close(mean.double(), train_features.mean(0), rtol=1e-4, atol=1e-6)


def test_flip_draws_a_view_per_image_and_changes_training(cached, tmp_path, capsys):
    order, flipped = epoch_order(1000, torch.Generator().manual_seed(0), flip=True)
    assert sorted(order.tolist()) == list(range(1000))
    assert 400 < int(flipped.sum()) < 600
    assert train_cli(cached, tmp_path / "plain", capsys, "--epochs", "2")[0] == 0
    assert train_cli(cached, tmp_path / "flip", capsys, "--epochs", "2", "--flip")[0] == 0
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["state_dict"]
    flip = torch.load(tmp_path / "flip" / "last.pt", weights_only=True)["state_dict"]
    assert not torch.equal(plain["weight"], flip["weight"])


def test_init_fc8_starts_from_the_imagenet_rows_of_the_dataset_wnids(
    dataset, tmp_path, torch_home, capsys
):
    imagenet = extract_features(dataset, tmp_path / "imagenet.h5", weights="imagenet")
    fc8 = load_network("alexnet", "imagenet").classifier[6]
    rows = [imagenet_wnids().index(wnid) for wnid in WNIDS]
    assert rows == [1, 25, 30]
    with store.open_complete(imagenet) as file:
        head = pretrained_classifier_head(store.provenance(file), list(WNIDS), "test", "fc8")
    torch.testing.assert_close(head.weight, fc8.weight[rows], rtol=0, atol=0)
    torch.testing.assert_close(head.bias, fc8.bias[rows], rtol=0, atol=0)

    status, out, _ = train_cli(
        imagenet, tmp_path / "model", capsys, "--init", "fc8", "--epochs", "4", "--standardize"
    )
    assert status == 0
    assert "epoch 0/4  train loss " in out and "epoch 4/4" in out
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    assert state["history_epochs"] == [0, 1, 2, 3, 4]
    accuracies = state["validation_accuracy"]
    best = torch.load(tmp_path / "model" / "best.pt", weights_only=True)
    assert best["best_epoch"] == state["best_epoch"] == accuracies.index(max(accuracies))
    # The rows of random weights start at chance; training reaches 100% at epoch 1 and stays
    # there, so keeping epoch 0, or the last epoch on a tie, would both be caught.
    assert accuracies[0] < max(accuracies) and 0 < best["best_epoch"] < 4
    assert best["epoch"] == best["best_epoch"]
    with store.open_complete(imagenet) as file:
        val = store.read_split(file, "val")
    head = best["state_dict"]
    logits = torch.from_numpy(val.features.astype(np.float32)) @ head["weight"].T + head["bias"]
    recomputed = (logits.argmax(1).numpy() == val.labels).mean()
    assert 100 * recomputed == pytest.approx(max(accuracies))

    assert (
        train_cli(imagenet, tmp_path / "untrained", capsys, "--init", "fc8", "--epochs", "0")[0]
        == 0
    )
    untrained = torch.load(tmp_path / "untrained" / "best.pt", weights_only=True)
    torch.testing.assert_close(untrained["state_dict"]["weight"], fc8.weight[rows])


def test_init_fc8_is_refused_for_features_from_other_weights(cached, tmp_path, capsys):
    status, _, err = train_cli(cached, tmp_path / "model", capsys, "--init", "fc8")
    assert_one_line_error(status, err, "pretrained ImageNet weights", str(cached))


def test_fc8_rows_need_imagenet_wnids():
    with pytest.raises(UserError, match="not ImageNet-1k classes"):
        classifier_head(torch.nn.Linear(4096, 1000), ["digit0"])


def test_imagenet_wnid_list_is_the_1000_class_order():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert (wnids[0], wnids[1], wnids[-1]) == ("n01440764", "n01443537", "n15075141")
    assert {"n01629819", "n01641577", "n02124075", "n04067472"} <= set(wnids)


def test_incomplete_features_file_is_refused(cached, tmp_path, capsys):
    broken = tmp_path / "broken.h5"
    shutil.copy(cached, broken)
    with h5py.File(broken, "r+") as file:
        file.attrs["complete"] = False
    status, _, err = train_cli(broken, tmp_path / "model", capsys)
    assert_one_line_error(status, err, "incomplete feature file", str(broken))


def test_missing_train_split_is_refused(dataset, tmp_path, weights_file, capsys):
    val_only = extract_features(
        dataset, tmp_path / "val.h5", splits=["val"], weights=str(weights_file)
    )
    status, _, err = train_cli(val_only, tmp_path / "model", capsys)
    assert_one_line_error(status, err, "no 'train' split", str(val_only))


def test_without_val_split_it_trains_and_selects_on_train_loss(
    dataset, tmp_path, weights_file, capsys
):
    train_only = extract_features(
        dataset, tmp_path / "train.h5", splits=["train"], weights=str(weights_file)
    )
    status, out, err = train_cli(train_only, tmp_path / "model", capsys, "--epochs", "2")
    assert status == 0
    assert "no val split" in err and "train loss" in err
    assert "val -" in out
    best = torch.load(tmp_path / "model" / "best.pt", weights_only=True)
    assert best["selection"] == "train loss"
    assert best["train_loss"][best["best_epoch"] - 1] == min(best["train_loss"])
    assert all(math.isnan(value) for value in best["validation_accuracy"])


def test_non_finite_features_are_refused(cached, tmp_path, capsys):
    poisoned = tmp_path / "nan.h5"
    shutil.copy(cached, poisoned)
    with h5py.File(poisoned, "r+") as file:
        file["train/features"][4, 7] = np.inf
    status, _, err = train_cli(poisoned, tmp_path / "model", capsys)
    assert_one_line_error(status, err, "NaN or inf", "row 4", str(poisoned))


def test_resume_with_another_class_count_is_refused(cached, tmp_path, weights_file, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    two = write_tiny_imagenet(
        tmp_path / "two",
        train_per_class=2,
        val_per_class=1,
        wnids=WNIDS[:2],
        names=("goldfish", "salamander"),
    )
    two_classes = extract_features(two, tmp_path / "two.h5", weights=str(weights_file))
    status, _, err = train_cli(two_classes, tmp_path / "model", capsys, "--epochs", "2", "--resume")
    assert_one_line_error(status, err, "trained on 3 classes", "from the 2 of")


def test_resume_with_other_settings_is_refused(cached, tmp_path, capsys):
    assert train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    status, _, err = train_cli(
        cached, tmp_path / "model", capsys, "--epochs", "2", "--resume", "--lr", "0.01"
    )
    assert_one_line_error(status, err, "--lr 0.001 -> 0.01")
    status, _, err = train_cli(
        cached, tmp_path / "model", capsys, "--epochs", "2", "--resume", "--precision", "bf16"
    )
    assert_one_line_error(status, err, "--precision fp32 -> bf16")
    status, _, err = train_cli(cached, tmp_path / "model", capsys, "--epochs", "2")
    assert_one_line_error(status, err, "--resume", "--overwrite")


def test_checkpoint_that_is_not_ours_is_refused(cached, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"model": torch.zeros(2)}, model / "last.pt")
    status, _, err = train_cli(cached, model, capsys, "--resume")
    assert_one_line_error(status, err, "not a head checkpoint")
    (model / "best.pt").write_bytes(b"not a zip at all")
    status, _, err = cli(evaluate, ["--model", model, "--features", cached], capsys)
    assert_one_line_error(status, err, "not a loadable checkpoint")


def test_features_that_do_not_fit_in_memory_are_refused(cached, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "available_memory", lambda: 1000)
    status, out, err = train_cli(cached, tmp_path / "model", capsys)
    assert "MiB in memory" in out
    assert_one_line_error(status, err, "need", "MiB of host memory")
    assert not (tmp_path / "model").exists()


def test_command_line_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    missing = tmp_path / "missing.h5"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "head.train",
            "--features",
            str(missing),
            "--save",
            str(tmp_path / "model"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing}: feature file not found"


@pytest.mark.parametrize(
    "command, example",
    [
        (train, "python -m head.train --features features.h5 --save model --resume"),
        (evaluate, "python -m head.evaluate --model model --features features.h5"),
    ],
)
def test_help_shows_real_invocations(command, example, capsys):
    status, out, _ = cli(command, ["--help"], capsys)
    assert status == 0 and example in out


def test_checkpoint_carries_a_seeded_float16_replay_set_of_train_rows(
    cached, tmp_path, capsys, monkeypatch
):
    """CPU, exact: the replay rows are rows of the train split (float16 as stored) with their
    labels, `REPLAY_PER_CLASS` of each class, the same in memory and streamed, drawn by --seed."""
    monkeypatch.setattr(features, "REPLAY_PER_CLASS", 2)
    status, _, _ = train_cli(cached, tmp_path / "model", capsys, "--epochs", "1")
    assert status == 0
    replay = torch.load(tmp_path / "model" / "best.pt", weights_only=True)["replay"]
    assert replay["features"].dtype == torch.float16 and replay["features"].shape == (6, 4096)
    assert replay["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    with store.open_complete(cached) as file:
        rows = store.read_rows(file, "train")
        labels = store.read_labels(file, "train")
    for row, label in zip(replay["features"].numpy(), replay["labels"].numpy()):
        matches = np.flatnonzero((rows == row).all(axis=1))
        assert len(matches) == 1 and labels[matches[0]] == label
    in_memory = features.load(cached, report=lambda line: None, stream=False)
    streamed = features.load(cached, report=lambda line: None, stream=True)
    chosen = features.replay_set(in_memory, seed=0)
    assert torch.equal(chosen[0].half(), replay["features"])
    assert all(map(torch.equal, features.replay_set(streamed, seed=0), chosen))
    other = features.replay_set(in_memory, seed=1)  # negative control: another draw
    assert not torch.equal(other[0], chosen[0]) and torch.equal(other[1], chosen[1])


def test_replay_set_that_does_not_fit_the_head_is_refused():
    layer = torch.nn.Linear(8, 3)
    saved = checkpoint.Checkpoint(
        weight=layer.weight.detach(),
        bias=layer.bias.detach(),
        wnids=["a", "b", "c"],
        class_names={},
        provenance=dict.fromkeys(PROVENANCE_KEYS, "x"),
    )
    state = saved.to_dict()
    assert "replay" not in state  # absent, as in a checkpoint written before it existed
    assert checkpoint.Checkpoint.from_dict(state, "old.pt").replay_rows() is None
    state["replay"] = checkpoint.replay_entry(torch.zeros(2, 8), torch.tensor([0, 3]))
    with pytest.raises(UserError, match=r"m.pt: 'replay' must hold .* labels in 0\.\.2"):
        checkpoint.Checkpoint.from_dict(state, "m.pt")
    state["replay"]["labels"] = torch.tensor([0, 2])
    features_back, labels_back = checkpoint.Checkpoint.from_dict(state, "m.pt").replay_rows()
    assert features_back.dtype == torch.float32 and labels_back.tolist() == [0, 2]
