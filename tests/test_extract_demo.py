"""The built-in demo dataset: scikit-learn's digits written in the Tiny ImageNet layout."""

from __future__ import annotations

from PIL import Image

from extract import demo
from extract.dataset import read_classes, read_manifest


def test_demo_dataset_has_the_tiny_imagenet_layout_with_real_jpegs(tmp_path):
    count = demo.write_dataset(tmp_path / "digits")
    classes = read_classes(tmp_path / "digits")
    assert classes.wnids == [f"digit{d}" for d in range(10)]
    assert classes.names[3] == "three"
    train, val = (read_manifest(tmp_path / "digits", s, classes) for s in ("train", "val"))
    test = read_manifest(tmp_path / "digits", "test", classes)
    assert len(train.paths) + len(val.paths) + len(test.paths) == count == 1797
    assert sorted(set(val.labels)) == list(range(10)) and set(test.labels) == {-1}
    with Image.open(tmp_path / "digits" / val.paths[0]) as image:
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"


def test_demo_picks_imagenet_weights_when_torchvision_can_load_them(torch_home):
    assert demo.pick_weights() == "imagenet"
