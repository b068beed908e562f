"""A checkpoint written before the checkpoint had one owner still loads, evaluates, resumes and
runs through live.

tests/data/checkpoint-0534696 was written by the code of commit 0534696: `head.train` for 3
epochs (batch 4, lr 0.01, CPU) on ResNet-18 `--weights random` features of `write_tiny_imagenet`
(4 train and 2 val images per class), best.pt at epoch 1. expected.json holds what that code's
`head.evaluate` and `live.load(...).predict` gave on the val images, and epoch4_uninterrupted.pt
the layer of the same run carried on uninterrupted to epoch 4. All on the CPU in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import head
import live
from conftest import extract_features, write_tiny_imagenet
from extract.errors import UserError
from head import checkpoint

FIXTURE = Path(__file__).parent / "data" / "checkpoint-0534696"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> tuple[Path, Path]:
    """The fixture's folder copied (best.pt, last.pt, history.csv) and the feature file it was
    trained on, extracted again (random weights are seeded, so the features are the same)."""
    root = tmp_path_factory.mktemp("old-run")
    data = write_tiny_imagenet(root / "data", train_per_class=4, val_per_class=2, test_images=0)
    features = extract_features(
        data, root / "features.h5", splits=["train", "val"], backbone="resnet18"
    )
    model = root / "model"
    model.mkdir()
    for name in ("best.pt", "last.pt", "history.csv"):
        shutil.copy(FIXTURE / name, model / name)
    return model, features


def test_checkpoint_of_0534696_loads_with_what_it_recorded():
    best = checkpoint.load(FIXTURE)
    last = checkpoint.load(FIXTURE / "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 3)
    assert best["best_accuracy"] == 100.0
    assert best["numeric_class_names"] == ["n01443537", "n01629819", "n01641577"]
    assert best["tiny_class"]["n01641577"] == "bullfrog"
    assert best["state_dict"]["weight"].shape == (3, 512)
    assert best["features"]["backbone"] == "resnet18"


@pytest.mark.slow
def test_checkpoint_of_0534696_evaluates_as_it_did(old_run):
    model, features = old_run
    report = head.report(model, features, split="val")
    expected = EXPECTED["evaluate_val"]
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-6), key  # CPU float32
    # Negative control: the last epoch's head scores otherwise (66.7% against 100%).
    assert head.report(model / "last.pt", features, split="val")["top1"] != expected["top1"]


@pytest.mark.slow
def test_checkpoint_of_0534696_predicts_in_live_as_it_did(old_run):
    model, features = old_run
    images = model.parent / "data" / "val" / "images"
    predictor = live.load(model, device="cpu")
    for name, expected in EXPECTED["live_val"].items():
        (predicted,) = predictor.predict([images / name], topk=3)
        assert [row["wnid"] for row in predicted] == [row["wnid"] for row in expected]
        for row, reference in zip(predicted, expected):
            assert row["prob"] == pytest.approx(reference["prob"], abs=1e-5)  # CPU float32
    # Negative control: the last epoch's head gives other probabilities for the same image.
    other = live.load(model / "last.pt", device="cpu").predict([images / "val_0_0.JPEG"], topk=3)
    assert other[0][0]["prob"] != pytest.approx(EXPECTED["live_val"]["val_0_0.JPEG"][0]["prob"])


@pytest.mark.slow
def test_checkpoint_of_0534696_resumes_to_the_uninterrupted_run(old_run):
    model, features = old_run
    state = head.fit(
        features,
        model,
        device="cpu",
        epochs=4,
        batch_size=4,
        lr=0.01,
        resume=True,
        progress=False,
    )
    reference = torch.load(FIXTURE / "epoch4_uninterrupted.pt", weights_only=True)
    assert state["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    # CPU float32: the same steps in the same order give the same layer up to rounding.
    torch.testing.assert_close(state["state_dict"]["weight"], reference["weight"])
    torch.testing.assert_close(state["state_dict"]["bias"], reference["bias"])
    # Negative control: the layer resumed from differs from the one trained on.
    resumed_from = checkpoint.load(FIXTURE / "last.pt")["state_dict"]["weight"]
    assert not torch.allclose(resumed_from, reference["weight"])


def test_a_checkpoint_without_its_layer_is_refused(tmp_path):
    state = torch.load(FIXTURE / "best.pt", weights_only=True)
    del state["state_dict"]
    torch.save(state, tmp_path / "best.pt")
    with pytest.raises(UserError, match="missing state_dict"):
        checkpoint.load(tmp_path)
