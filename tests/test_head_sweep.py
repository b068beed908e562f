"""head.sweep: a grid of heads trained at once is K ordinary head.train runs; its outputs, its
selection, its bad input and its resume after SIGKILL.

All on the CPU in fp32. The reference is `head.train` (through `head.fit`) run once per cell
with the same settings and seed."""

from __future__ import annotations

import csv
import math
import random
import runpy
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_head import assert_one_line_error

import extract
import head
import live
from benchmarks import synthetic
from conftest import extract_features
from extract import store
from extract.errors import UserError, run_cli
from extract.preprocess import normalize, to_uint8
from head import checkpoint, grid, selection, sweep_report, sweeping

REPO = Path(__file__).resolve().parents[1]
QUICK = {"epochs": 3, "batch_size": 16, "progress": False}
# Three cells, one standardised: the grid 1e-3,3e-2 x 0,1e-3 x both holds them all.
CELLS = [(1e-3, 0.0, False), (3e-2, 1e-3, False), (1e-3, 1e-3, True)]
GRID = {"lr": "1e-3,3e-2", "weight_decay": "0,1e-3", "standardize": "both"}


def sweep_command() -> types.SimpleNamespace:
    """The command's module, run without importing it as ``head.sweep``: that import would
    replace the function `head.sweep` with the module on the package."""
    return types.SimpleNamespace(**runpy.run_module("head.sweep", run_name="head_sweep_command"))


def run_command(argv: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        run_cli(sweep_command().main, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def hard_features(tmp_path_factory) -> Path:
    """Hard synthetic features: 320 train and 80 val rows of 64 dimensions, 4 classes."""
    path = tmp_path_factory.mktemp("sweep") / "features.h5"
    return synthetic.write_features(path, 320, 4, val_rows=80, block=128, dim=64, hard=True)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.norm(value - reference) / torch.linalg.norm(reference)).item()


def head_name(lr: float, decay: float, standardize: bool) -> str:
    return grid.Cell(lr, decay, standardize).name


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["in memory", "streamed"])
def test_each_head_ends_with_the_weights_head_train_gives_with_its_settings(
    hard_features, tmp_path, stream
):
    """CPU, fp32: within 1e-5 relative (Frobenius norm of the difference over the norm); the
    best epoch and its val top-1 exactly."""
    options = {**QUICK, "stream": True if stream else None}
    if stream:
        options["max_memory"] = "40MB"  # a buffer smaller than the file: several fills
    rows = head.sweep(hard_features, tmp_path / "sweep", save_all=True, **GRID, **options)
    assert len(rows) == 8
    saved = torch.load(tmp_path / "sweep" / sweeping.STATE, weights_only=True)
    order = [tuple(cell) for cell in saved["cells"]]
    for lr, decay, standardize in CELLS:
        alone = head.fit(
            hard_features,
            tmp_path / head_name(lr, decay, standardize),
            lr=lr,
            weight_decay=decay,
            standardize=standardize,
            **options,
        )
        index = order.index((lr, decay, standardize))
        rows_of = slice(4 * index, 4 * index + 4)
        assert (
            relative_error(saved["weight"][rows_of], alone.checkpoint.trained_layer["weight"])
            < 1e-5
        )
        assert relative_error(saved["bias"][rows_of], alone.checkpoint.trained_layer["bias"]) < 1e-5
        best = checkpoint.load(tmp_path / "sweep" / "heads" / head_name(lr, decay, standardize))
        reference = checkpoint.load(tmp_path / head_name(lr, decay, standardize))
        for key in ("weight", "bias"):
            assert relative_error(best.layer[key], reference.layer[key]) < 1e-5
        assert best.best_epoch == reference.best_epoch
        assert best.best_top1 == reference.best_top1
    # Negative control: another cell's head is far from this run's.
    other = order.index(CELLS[1])
    assert (
        relative_error(
            saved["weight"][4 * other : 4 * other + 4], alone.checkpoint.trained_layer["weight"]
        )
        > 1e-2
    )


def test_best_pt_is_the_best_row_and_what_evaluate_recomputes(hard_features, tmp_path):
    rows = head.sweep(hard_features, tmp_path / "sweep", **GRID, **QUICK)
    best = [row for row in rows if row["best"]]
    assert len(best) == 1
    winner = best[0]
    others = [row for row in rows if not row["best"]]
    assert all(
        (row["val_top1"], -row["val_loss"]) <= (winner["val_top1"], -winner["val_loss"])
        for row in others
    )
    state = checkpoint.load(tmp_path / "sweep" / checkpoint.BEST)
    assert state.settings["lr"] == winner["lr"]
    assert state.settings["standardize"] == winner["standardize"]
    assert state.best_by == "validation top-1"
    assert state.selected_from["lr"] == [1e-3, 3e-2]
    measured = head.report(tmp_path / "sweep", hard_features)
    assert measured["top1"] == pytest.approx(winner["val_top1"])
    assert measured["epoch"] == winner["best_epoch"]


def test_outputs_csv_png_and_the_printed_table_sorted_by_val_top1(hard_features, tmp_path, capsys):
    argv = ["--features", hard_features, "--save", tmp_path / "sweep", "--epochs", "2"]
    status, out, _ = run_command(
        [*argv, "--batch-size", "16", "--no-progress", "--lr", "1e-3,3e-2", "--weight-decay", "0"],
        capsys,
    )
    assert status == 0
    with open(tmp_path / "sweep" / sweep_report.CSV) as stream:
        table = list(csv.DictReader(stream))
    assert list(table[0]) == list(sweep_report.COLUMNS) and len(table) == 4
    assert sum(row["best"] == "yes" for row in table) == 1
    assert (tmp_path / "sweep" / sweep_report.PNG).read_bytes()[:4] == b"\x89PNG"
    printed = [line.split() for line in out.splitlines() if line.startswith("adam")]
    top1 = [float(line[5]) for line in printed]
    assert len(top1) == 4 and top1 == sorted(top1, reverse=True)
    assert "<- best.pt" in out and "best.pt: adam" in out


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "", "--lr: empty list"),
        ("--lr", "-1e-3", "--lr: -1e-3 must be > 0"),
        ("--lr", "fast", "--lr: 'fast' is not a number"),
        ("--lr", "1e-3,0.001", "--lr: 0.001 given twice"),
        ("--weight-decay", "-1", "--weight-decay: -1 must be >= 0"),
        ("--knn", "10,1000", "--knn: k = 1000 is larger than the train split (320 images)"),
        ("--knn", "2.5", "--knn: 2.5 is not a whole number"),
        ("--holdout", "0.6", "--holdout 0.6: must be in (0, 0.5]"),
        ("--holdout", "0", "--holdout 0.0: must be in (0, 0.5]"),
    ],
)
def test_bad_grid_input_is_one_line_naming_the_flag_and_exit_2(
    hard_features, tmp_path, capsys, flag, value, message
):
    argv = ["--features", hard_features, "--save", tmp_path / "sweep", f"{flag}={value}"]
    status, _, err = run_command(argv, capsys)
    assert_one_line_error(status, err, message)
    assert not (tmp_path / "sweep").exists()


def test_a_grid_beyond_the_memory_is_refused_with_its_estimate_and_the_largest_that_fits(
    hard_features, tmp_path, monkeypatch, capsys
):
    one_head = grid.sweep_memory_bytes(1, 4, 64)
    monkeypatch.setattr(selection, "memory_available", lambda device: 7 * one_head)
    status, out, err = run_command(
        ["--features", hard_features, "--save", tmp_path / "sweep"], capsys
    )
    assert_one_line_error(status, err, "40 heads", "MiB", "largest grid that fits has 7 heads")
    assert out == "" and not (tmp_path / "sweep").exists()
    # Negative control: the same limit lets 7 heads through.
    assert head.sweep(
        hard_features,
        tmp_path / "seven",
        lr="1e-3",
        weight_decay="0,1e-5,1e-4,1e-3,1e-2,1e-1,1",
        standardize="off",
        **QUICK,
    )


def test_a_head_whose_loss_turns_nan_is_dropped_and_the_sweep_goes_on(hard_features, tmp_path):
    with pytest.warns(UserWarning, match="lr 1e\\+38 wd 0 raw: the train loss is nan"):
        rows = head.sweep(
            hard_features,
            tmp_path / "sweep",
            lr="1e-3,1e38",
            weight_decay="0",
            standardize="off",
            **QUICK,
        )
    dropped = next(row for row in rows if row["lr"] == 1e38)
    assert "dropped" in dropped["note"] and not dropped["best"]
    kept = next(row for row in rows if row["lr"] == 1e-3)
    assert kept["best"] and math.isfinite(kept["val_loss"])


def test_holdout_selects_on_train_rows_and_refits_the_winner_on_all_of_train(
    hard_features, tmp_path
):
    rows = head.sweep(
        hard_features,
        tmp_path / "sweep",
        holdout=0.25,
        lr="1e-3,3e-2",
        weight_decay="0",
        standardize="on",
        **QUICK,
    )
    winner = next(row for row in rows if row["best"])
    state = checkpoint.load(tmp_path / "sweep" / checkpoint.BEST)
    assert state.best_by.startswith("holdout top-1 (0.25 of train)")
    alone = head.fit(
        hard_features,
        tmp_path / "alone",
        lr=winner["lr"],
        weight_decay=0.0,
        standardize=True,
        **{**QUICK, "epochs": winner["best_epoch"]},
    )
    assert relative_error(state.weight, alone.checkpoint.weight) < 1e-6
    assert state.epoch == winner["best_epoch"]
    # Not what a selection on val would have trained: 240 of the 320 rows.
    trained = torch.load(tmp_path / "sweep" / sweeping.STATE, weights_only=True)
    assert trained["holdout"] == 0.25


def test_holdout_on_streamed_features_selects_each_head_on_the_held_out_rows(
    hard_features, tmp_path
):
    """CPU, fp32, streamed through a buffer smaller than the file: every head's selection
    top-1 is its saved best layer's top-1 on the seeded held-out rows of train, recomputed
    here from the file in memory; k-NN and ridge, which do not depend on the batch order, score
    what they score on the same holdout in memory (k-NN exactly, ridge within 1e-6), and the
    winner solved again on all of train is the in-memory run's within 1e-5."""
    grid_options = {"lr": "1e-3,3e-2", "weight_decay": "0", "standardize": "both"}
    baselines = {"holdout": 0.25, "knn": "1,5", "ridge": True}
    rows = head.sweep(
        hard_features,
        tmp_path / "sweep",
        stream=True,
        max_memory="40MB",
        save_all=True,
        **grid_options,
        **baselines,
        **QUICK,
    )
    in_memory = head.sweep(
        hard_features, tmp_path / "memory", stream=False, **grid_options, **baselines, **QUICK
    )
    probes = [row for row in rows if row["method"] != "adam"]
    assert [row["method"] for row in probes] == [
        row["method"] for row in in_memory if row["method"] != "adam"
    ]
    assert any(row["method"].startswith("knn") for row in probes)
    assert any(row["method"] == "ridge" for row in probes)
    for streamed, loaded in zip(probes, (row for row in in_memory if row["method"] != "adam")):
        if streamed["method"].startswith("knn"):
            assert streamed["val_top1"] == loaded["val_top1"]
        else:
            assert streamed["val_loss"] == pytest.approx(loaded["val_loss"], rel=1e-6)
            assert streamed["val_top1"] == pytest.approx(loaded["val_top1"], abs=1e-9)
    with store.open_complete(hard_features) as file:
        features = torch.from_numpy(file["train/features"][()]).float()
        labels = torch.from_numpy(store.read_labels(file, "train").astype(np.int64))
    _, held = grid.holdout_rows(len(labels), 0.25, seed=0)
    heads = [row for row in rows if row["method"] == "adam"]
    assert len(heads) == 4
    for row in heads:
        best = checkpoint.load(
            tmp_path / "sweep" / "heads" / head_name(row["lr"], 0.0, row["standardize"])
        )
        logits = features[held] @ best.weight.T + best.bias
        top1 = 100.0 * (logits.argmax(1) == labels[held]).double().mean().item()
        assert row["val_top1"] == pytest.approx(top1, abs=1e-9)
    # Ridge wins on these features (as below), and is solved again on all of train: the same
    # layer whether train was streamed or loaded.
    state = checkpoint.load(tmp_path / "sweep" / checkpoint.BEST)
    assert state.best_by.startswith("holdout top-1 (0.25 of train)")
    assert next(row for row in rows if row["best"])["method"] == "ridge"
    loaded_best = checkpoint.load(tmp_path / "memory" / checkpoint.BEST)
    assert relative_error(state.weight, loaded_best.weight) < 1e-5
    assert relative_error(state.bias, loaded_best.bias) < 1e-5


def test_holdout_rows_are_seeded_disjoint_and_cover_train():
    kept, held = grid.holdout_rows(100, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(100))
    assert torch.equal(held, grid.holdout_rows(100, 0.1, seed=3)[1])
    assert not torch.equal(held, grid.holdout_rows(100, 0.1, seed=4)[1])


def test_ties_in_top1_are_broken_by_the_lower_loss():
    rows = [
        {"method": "adam", "val_top1": 80.0, "val_loss": 0.7},
        {"method": "adam", "val_top1": 80.0, "val_loss": 0.5},
        {"method": "adam", "val_top1": 79.0, "val_loss": 0.1},
        {"method": "adam", "val_top1": math.nan, "val_loss": math.nan},
    ]
    assert [row["val_loss"] for row in sweep_report.ranked(rows)][:3] == [0.5, 0.7, 0.1]


def test_the_python_api_raises_user_error_for_what_the_command_refuses(hard_features, tmp_path):
    """The API names its keywords where the command names its flags."""
    with pytest.raises(UserError, match="^lr: 0.001 given twice") as error:
        head.sweep(hard_features, tmp_path / "sweep", lr=[1e-3, 1e-3])
    assert error.value.for_command() == "--lr: 0.001 given twice"
    with pytest.raises(UserError, match="^standardize='sometimes'"):
        head.sweep(hard_features, tmp_path / "sweep", standardize="sometimes")
    with pytest.raises(TypeError, match="epoch"):
        head.sweep(hard_features, tmp_path / "sweep", epoch=3)
    head.sweep(hard_features, tmp_path / "sweep", lr="1e-3", weight_decay="0", **QUICK)
    with pytest.raises(UserError, match="a sweep is already saved here"):
        head.sweep(hard_features, tmp_path / "sweep", lr="1e-3", weight_decay="0", **QUICK)


@pytest.mark.slow
def test_a_sweep_killed_at_random_moments_resumes_to_the_uninterrupted_result(
    hard_features, tmp_path
):
    """CPU, fp32, exact: the resumed sweep's weights and report equal the straight one's."""
    argv = ["--features", str(hard_features), "--batch-size", "16", "--no-progress"]
    argv += ["--lr", "1e-3,3e-2", "--weight-decay", "0,1e-3", "--epochs", "150"]
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "-m", "head.sweep", *argv, "--save", str(straight)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    killed = tmp_path / "killed"
    rng = random.Random(0)
    reached = []
    for attempt in range(3):
        process = subprocess.Popen(
            [sys.executable, "-m", "head.sweep", *argv, "--save", str(killed)]
            + (["--resume"] if attempt else []),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while not (killed / sweeping.STATE).exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        reached.append(torch.load(killed / sweeping.STATE, weights_only=True)["epoch"])
    assert reached[0] < 150, "killed before the end, or the test shows nothing"
    subprocess.run(
        [sys.executable, "-m", "head.sweep", *argv, "--save", str(killed), "--resume"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ours = torch.load(killed / sweeping.STATE, weights_only=True)
    theirs = torch.load(straight / sweeping.STATE, weights_only=True)
    assert ours["epoch"] == theirs["epoch"] == 150
    assert torch.equal(ours["weight"], theirs["weight"])
    assert torch.equal(ours["best_weight"], theirs["best_weight"])
    best_ours = checkpoint.load(killed / checkpoint.BEST)
    best_theirs = checkpoint.load(straight / checkpoint.BEST)
    assert torch.equal(best_ours.weight, best_theirs.weight)

    def columns(path: Path) -> list[list[str]]:
        with open(path / sweep_report.CSV) as stream:
            return [row[:9] for row in csv.reader(stream)]  # seconds differ

    assert columns(killed) == columns(straight)


def test_help_shows_real_invocations(capsys):
    status, out, _ = run_command(["--help"], capsys)
    assert status == 0
    assert "python -m head.sweep --features features.h5 --save sweep --holdout 0.1" in out


def test_best_pt_runs_in_live_with_the_winning_layer(features_file, tiny_imagenet, tmp_path):
    """CPU, fp32: live's probabilities on the val images are the softmax of the stored
    (float16) features under best.pt's layer, within 2e-3; another head's are not; the program
    `live.export` writes from best.pt gives live's probabilities within 1e-5."""
    rows = head.sweep(
        features_file, tmp_path / "sweep", lr="1e-3,1e-2", weight_decay="0", save_all=True, **QUICK
    )
    loser = next(row for row in rows if not row["best"])
    cache = extract.load(features_file)["val"]
    features = torch.from_numpy(cache.features).double()

    def probabilities(layer: dict) -> torch.Tensor:
        logits = features @ layer["weight"].double().T + layer["bias"].double()
        return logits.softmax(1)

    model = live.load(tmp_path / "sweep", device="cpu")
    predicted = model.predict([tiny_imagenet / path for path in cache.paths], topk=3)
    seen = torch.tensor([[entry["prob"] for entry in top] for top in predicted]).double()
    indices = torch.tensor([[entry["index"] for entry in top] for top in predicted])
    expected = probabilities(checkpoint.load(tmp_path / "sweep").layer)
    assert torch.allclose(seen, expected.gather(1, indices), atol=2e-3)
    other = head_name(loser["lr"], loser["weight_decay"], loser["standardize"])
    layer = checkpoint.load(tmp_path / "sweep" / "heads" / other).layer
    assert not torch.allclose(seen, probabilities(layer).gather(1, indices), atol=2e-3)
    program = torch.export.load(model.export(tmp_path / "live.pt2")[0]).module()
    with Image.open(tiny_imagenet / cache.paths[0]) as image:
        pixels = to_uint8(image, model.params)
    with torch.no_grad():
        exported = program(normalize(pixels[None], model.params)).softmax(1)[0]
    torch.testing.assert_close(exported[indices[0]].double(), seen[0], rtol=0, atol=1e-5)
    loser_first = probabilities(layer)[0, indices[0]]
    assert not torch.allclose(exported[indices[0]].double(), loser_first, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sweep_on_cuda_follows_the_cpu_sweep(hard_features, tmp_path):
    """CUDA fp32 (TF32 off, torch's default for matmuls) against the CPU: every head's
    weights within 1e-4 relative (different reduction orders over a few dozen steps)."""
    options = {**GRID, **QUICK}
    head.sweep(hard_features, tmp_path / "cpu", device="cpu", **options)
    head.sweep(hard_features, tmp_path / "cuda", device="cuda", **options)
    on_cpu = torch.load(tmp_path / "cpu" / sweeping.STATE, weights_only=True)
    on_cuda = torch.load(tmp_path / "cuda" / sweeping.STATE, weights_only=True)
    assert relative_error(on_cuda["weight"], on_cpu["weight"]) < 1e-4
    assert relative_error(on_cuda["best_weight"], on_cpu["best_weight"]) < 1e-4


def test_knn_rows_are_a_numpy_brute_force_of_the_weighted_vote(hard_features, tmp_path):
    """CPU, float64 NumPy reference: cosine similarity, exp(sim / 0.07) votes, every k."""
    rows = head.sweep(
        hard_features, tmp_path / "sweep", lr="1e-3", weight_decay="0", knn="1,5,20", **QUICK
    )
    cache = extract.load(hard_features)
    train, val = cache["train"], cache["val"]

    def unit(features):
        rows64 = features.astype(np.float64)
        return rows64 / np.linalg.norm(rows64, axis=1, keepdims=True)

    similarity = unit(val.features) @ unit(train.features).T
    order = np.argsort(-similarity, axis=1)
    for k in (1, 5, 20):
        votes = np.zeros((len(val.labels), 4))
        for query, neighbours in enumerate(order[:, :k]):
            for neighbour in neighbours:
                weight = np.exp(similarity[query, neighbour] / 0.07)
                votes[query, train.labels[neighbour]] += weight
        expected = 100.0 * np.mean(votes.argmax(1) == val.labels)
        row = next(row for row in rows if row["method"] == f"knn k={k}")
        assert row["val_top1"] == pytest.approx(expected)
        assert not row["best"]
    assert sum(row["method"].startswith("knn") for row in rows) == 3


def test_the_best_ridge_layer_wins_best_pt_with_its_temperature_folded_in(hard_features, tmp_path):
    """CPU, fp32: a sweep of heads that barely train (lr 1e-7, one epoch) loses to ridge;
    best.pt's logits are the ridge scores divided by the fitted temperature."""
    rows = head.sweep(
        hard_features,
        tmp_path / "sweep",
        lr="1e-7",
        weight_decay="0",
        standardize="off",
        ridge=True,
        **{**QUICK, "epochs": 1},
    )
    ridge_rows = [row for row in rows if row["method"] == "ridge"]
    assert len(ridge_rows) == 20
    winner = next(row for row in rows if row["best"])
    assert winner["method"] == "ridge"
    assert winner["val_top1"] == max(row["val_top1"] for row in rows)
    state = checkpoint.load(tmp_path / "sweep")
    assert state.settings["method"] == "ridge" and state.settings["l2"] == winner["weight_decay"]
    measured = head.report(tmp_path / "sweep", hard_features)
    assert measured["top1"] == pytest.approx(winner["val_top1"])
    val = extract.load(hard_features)["val"]
    logits = torch.from_numpy(val.features).double() @ state.weight.double().T + state.bias
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(val.labels).long())
    assert loss.item() == pytest.approx(winner["val_loss"], rel=1e-4)


def test_with_holdout_the_ridge_winner_is_solved_again_on_all_of_train(hard_features, tmp_path):
    """CPU: best.pt is ridge.fit_ridge on the whole train split at the chosen l2, over the
    temperature fitted on the held-out rows (float32 within 1e-5)."""
    from head import features, ridge

    head.sweep(
        hard_features,
        tmp_path / "sweep",
        holdout=0.25,
        lr="1e-7",
        weight_decay="0",
        standardize="off",
        ridge=True,
        **{**QUICK, "epochs": 1},
    )
    state = checkpoint.load(tmp_path / "sweep")
    assert state.settings["method"] == "ridge"
    assert state.best_by.startswith("holdout top-1 (0.25 of train)")
    whole = features.load(hard_features, report=lambda line: None).train
    fit = ridge.fit_ridge(whole, 4, [state.settings["l2"]], state.settings["standardize"])
    expected = fit.weights[0] / state.settings["temperature"]
    assert relative_error(state.weight, expected) < 1e-5
    # Negative control: solved on the 240 rows trained on, the layer differs.
    kept, _ = grid.holdout_rows(320, 0.25, seed=0)
    part = features.SplitTensors("train", whole.features[kept], whole.labels[kept])
    other = ridge.fit_ridge(part, 4, [state.settings["l2"]], False).weights[0]
    assert relative_error(state.weight, other / state.settings["temperature"]) > 1e-3


@pytest.mark.slow
def test_with_flip_each_head_draws_the_views_its_own_run_draws(
    tiny_imagenet, tmp_path, weights_file
):
    """CPU, fp32, within 1e-5 relative: flipped views drawn from the one generator."""
    cached = extract_features(
        tiny_imagenet, tmp_path / "f.h5", flip=True, weights=str(weights_file)
    )
    options = {"epochs": 3, "batch_size": 5, "progress": False}
    head.sweep(
        cached,
        tmp_path / "sweep",
        lr="1e-3,1e-2",
        weight_decay="0",
        standardize="on",
        flip=True,
        **options,
    )
    saved = torch.load(tmp_path / "sweep" / sweeping.STATE, weights_only=True)
    flipped = head.fit(cached, tmp_path / "flip", lr=1e-2, standardize=True, flip=True, **options)
    plain = head.fit(cached, tmp_path / "plain", lr=1e-2, standardize=True, **options)
    rows = slice(3, 6)  # the second head: lr 1e-2
    assert relative_error(saved["weight"][rows], flipped.checkpoint.trained_layer["weight"]) < 1e-5
    assert relative_error(saved["weight"][rows], plain.checkpoint.trained_layer["weight"]) > 1e-3


def test_resuming_with_other_settings_is_refused_naming_what_changed(hard_features, tmp_path):
    """A run and a sweep continue only the training they saved: another seed, learning rate
    or grid is one line naming the change, and what was saved stays as it was."""
    head.fit(hard_features, tmp_path / "run", lr=1e-3, **{**QUICK, "epochs": 1})
    saved = (tmp_path / "run" / checkpoint.LAST).read_bytes()
    with pytest.raises(UserError, match=r"cannot resume with other settings \(.*lr 0.001 -> 0.01"):
        head.fit(hard_features, tmp_path / "run", lr=1e-2, resume=True, **QUICK)
    assert (tmp_path / "run" / checkpoint.LAST).read_bytes() == saved
    head.sweep(hard_features, tmp_path / "sweep", **GRID, **{**QUICK, "epochs": 1})
    with pytest.raises(UserError, match=r"--seed 0 -> 3; --lr, --weight-decay or --standardize"):
        head.sweep(hard_features, tmp_path / "sweep", lr="1e-3", seed=3, resume=True, **{**QUICK})
