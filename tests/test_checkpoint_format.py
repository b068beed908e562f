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


def identical(a, b) -> bool:
    """Equal entry for entry, tensors bit for bit (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(identical, a, b))
    return type(a) is type(b) and a == b


def test_checkpoint_of_0534696_loads_with_what_it_recorded():
    best = checkpoint.load(FIXTURE)
    last = checkpoint.load(FIXTURE / "last.pt")
    assert (best.epoch, last.epoch) == (1, 3)
    assert best.best_top1 == 100.0 and best.best_epoch == 1 and best.best_by == "validation top-1"
    assert best.wnids == ["n01443537", "n01629819", "n01641577"]
    assert best.names[2] == "bullfrog"
    assert best.weight.shape == (3, 512) and best.bias.shape == (3,)
    assert (
        best.provenance["backbone"] == "resnet18"
        and checkpoint.preprocess_of(best, "best.pt").crop_size == 224
    )
    assert last.history["epoch"] == [1, 2, 3]
    assert last.history["train_loss"][0] == pytest.approx(6.781205813, rel=1e-9)
    assert last.settings["lr"] == 0.01 and last.selected_from is None
    # What is read is what was written: the file's dict comes back entry for entry.
    raw = torch.load(FIXTURE / "last.pt", weights_only=True)
    again = last.to_dict()
    assert again.keys() == raw.keys()
    assert identical(again, raw)
    # Negative control: one value changed in one nested entry is seen.
    raw["args"]["lr"] = 0.02
    assert not identical(again, raw)


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
    assert state["train_loss"] == pytest.approx(
        reference["train_loss"], rel=1e-6
    )  # head.fit's dict
    # CPU float32: the same steps in the same order give the same layer up to rounding.
    torch.testing.assert_close(state["state_dict"]["weight"], reference["weight"])
    torch.testing.assert_close(state["state_dict"]["bias"], reference["bias"])
    # Negative control: the layer resumed from differs from the one trained on.
    resumed_from = checkpoint.load(FIXTURE / "last.pt").weight
    assert not torch.allclose(resumed_from, reference["weight"])


def test_a_checkpoint_without_its_layer_is_refused(tmp_path):
    state = torch.load(FIXTURE / "best.pt", weights_only=True)
    del state["state_dict"]
    torch.save(state, tmp_path / "best.pt")
    with pytest.raises(UserError, match="missing state_dict"):
        checkpoint.load(tmp_path)
