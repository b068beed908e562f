"""Extracted features are torchvision's AlexNet fc7, computed the plain torchvision way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import alexnet
from torchvision.models.feature_extraction import create_feature_extractor

from conftest import WNIDS, extract_features
from extract import store
from extract.backbone import default_preprocess


def reference_fc7(weights_file: Path, image_files: list[Path]) -> np.ndarray:
    """fc7 the way a user writes it: torchvision transforms, the model's own classifier.5."""
    model = alexnet(weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    model.eval()
    fc7 = create_feature_extractor(model, return_nodes={"classifier.5": "fc7"})
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in image_files])
        return fc7(batch)["fc7"].numpy()


def max_relative_row_error(ours: np.ndarray, reference: np.ndarray) -> float:
    errors = np.linalg.norm(ours - reference, axis=1) / np.linalg.norm(reference, axis=1)
    return float(errors.max())


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_features_match_torchvision_reference(tiny_imagenet, tmp_path, weights_file):
    out = extract_features(
        tiny_imagenet,
        tmp_path / "f.h5",
        weights=str(weights_file),
        store_dtype="float32",
        precision="fp32",
    )
    with store.open_complete(out) as file:
        for split in ("train", "val"):
            arrays = store.read_split(file, split)
            assert arrays.features.dtype == np.float32
            reference = reference_fc7(weights_file, [tiny_imagenet / p for p in arrays.paths])
            assert max_relative_row_error(arrays.features, reference) <= 1e-3


def test_float16_storage_stays_close_to_float32(tiny_imagenet, tmp_path, weights_file):
    half = extract_features(tiny_imagenet, tmp_path / "h.h5", weights=str(weights_file))
    full = extract_features(
        tiny_imagenet, tmp_path / "f.h5", weights=str(weights_file), store_dtype="float32"
    )
    with h5py.File(half) as a, h5py.File(full) as b:
        assert a["train/features"].dtype == np.float16
        error = max_relative_row_error(
            a["train/features"][()].astype(np.float32), b["train/features"][()]
        )
        assert error <= 1e-3


# CPU bf16 against CPU fp32, per row ||bf16 - fp32|| / ||fp32||: at most 0.0041 measured on a
# 2-core CPU; two images of the same class differ by 0.046 or more.
CPU_BF16_ROW_TOLERANCE = 0.015


def test_bf16_compute_stays_within_stated_tolerance(tiny_imagenet, tmp_path, weights_file):
    """On the CPU, bf16 features are within 1.5% (per row) of fp32, and the same comparison
    refuses the features of the neighbouring image."""
    bf16, fp32 = (
        extract_features(
            tiny_imagenet,
            tmp_path / f"{precision}.h5",
            weights=str(weights_file),
            device="cpu",
            precision=precision,
            store_dtype="float32",
        )
        for precision in ("bf16", "fp32")
    )
    with h5py.File(bf16) as a, h5py.File(fp32) as b:
        assert a.attrs["precision"] == "bf16"
        for split in ("train", "val"):
            got, expected = a[split]["features"][()], b[split]["features"][()]
            assert 0 < max_relative_row_error(got, expected) <= CPU_BF16_ROW_TOLERANCE
            neighbour = np.roll(got, 1, axis=0)
            assert max_relative_row_error(neighbour, expected) > CPU_BF16_ROW_TOLERANCE


def test_labels_paths_classes_and_provenance(tiny_imagenet, tmp_path, weights_file):
    before = tree_digest(tiny_imagenet)
    out = extract_features(
        tiny_imagenet, tmp_path / "f.h5", weights=str(weights_file), splits=["train", "val", "test"]
    )
    assert tree_digest(tiny_imagenet) == before, "the data folder must not change"
    with store.open_complete(out) as file:
        classes = store.read_classes(file)
        assert classes.wnids == sorted(WNIDS)
        assert classes.names[classes.wnids.index("n01443537")] == "goldfish"
        annotations = dict(
            line.split("\t")[:2]
            for line in (tiny_imagenet / "val/val_annotations.txt").read_text().splitlines()
        )
        val = store.read_split(file, "val")
        for path, label in zip(val.paths, val.labels):
            assert classes.wnids[label] == annotations[Path(path).name]
        train = store.read_split(file, "train")
        for path, label in zip(train.paths, train.labels):
            assert path.split("/")[1] == classes.wnids[label]
        test = store.read_split(file, "test")
        assert len(test.paths) == 2 and set(test.labels) == {-1}
        attrs = store.read_attrs(file)
        assert attrs["node"] == "classifier.5" and attrs["backbone"] == "alexnet"
        assert attrs["store_dtype"] == "float16" and attrs["precision"] == "fp32"
        assert len(attrs["weights_sha256"]) == 64
        assert '"resize_size": 256' in attrs["preprocess"]
        assert attrs["torch_version"] == torch.__version__


def test_imagefolder_layout_works(tmp_path, weights_file):
    root = tmp_path / "flowers"
    for label, name in enumerate(("daisy", "tulip")):
        (root / name).mkdir(parents=True)
        for index in range(3):
            from conftest import pattern_image

            pattern_image(label, index, size=80).save(root / name / f"{index}.jpg")
    out = extract_features(root, tmp_path / "f.h5", weights=str(weights_file))
    with store.open_complete(out) as file:
        assert store.splits(file) == ["train"]
        assert store.read_classes(file).wnids == ["daisy", "tulip"]
        assert list(store.read_split(file, "train").labels) == [0, 0, 0, 1, 1, 1]


def test_imagenet_weights_load_through_torchvision_cache(
    tiny_imagenet, tmp_path, torch_home, weights_file
):
    by_name = extract_features(tiny_imagenet, tmp_path / "a.h5", weights="imagenet", splits=["val"])
    by_path = extract_features(
        tiny_imagenet, tmp_path / "b.h5", weights=str(weights_file), splits=["val"]
    )
    with h5py.File(by_name) as a, h5py.File(by_path) as b:
        assert a.attrs["weights"] == "imagenet"
        assert a.attrs["weights_sha256"] == b.attrs["weights_sha256"]
        np.testing.assert_array_equal(a["val/features"][()], b["val/features"][()])


def test_flip_stores_features_of_the_mirrored_image(tiny_imagenet, tmp_path, weights_file):
    out = extract_features(
        tiny_imagenet,
        tmp_path / "f.h5",
        weights=str(weights_file),
        flip=True,
        store_dtype="float32",
        splits=["val"],
    )
    with store.open_complete(out) as file:
        arrays = store.read_split(file, "val", with_flip=True)
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    files = []
    for path in arrays.paths:
        target = mirrored / Path(path).name
        Image.open(tiny_imagenet / path).transpose(Image.FLIP_LEFT_RIGHT).save(
            target.with_suffix(".png")
        )
        files.append(target.with_suffix(".png"))
    reference = reference_fc7(weights_file, files)
    assert max_relative_row_error(arrays.features_flip, reference) <= 1e-3
    assert max_relative_row_error(arrays.features, reference) > 1e-2


def test_large_images_shrunk_match_torchvision_reference(tmp_path, weights_file):
    """Shrinking (unlike Tiny ImageNet's enlarging) may differ by one level from PIL."""
    root = tmp_path / "photos"
    for label, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for index in range(2):
            from conftest import pattern_image

            pattern_image(label, index, size=300).resize((400, 300)).save(
                root / name / f"{index}.jpg", quality=95
            )
    out = extract_features(
        root, tmp_path / "f.h5", weights=str(weights_file), store_dtype="float32"
    )
    with store.open_complete(out) as file:
        arrays = store.read_split(file, "train")
    reference = reference_fc7(weights_file, [root / p for p in arrays.paths])
    assert max_relative_row_error(arrays.features, reference) <= 1e-3


def test_batched_resize_on_the_device_equals_resizing_each_image():
    from conftest import pattern_image
    from extract.images import Collate, crops_on_device
    from extract.preprocess import decode, resize_crop

    items = [(i, decode(pattern_image(i % 3, i)), "") for i in range(5)] + [(5, None, "bad")]
    deferred = Collate(default_preprocess(), defer_resize=True)(items)
    eager = Collate(default_preprocess(), defer_resize=False)(items)
    assert not deferred.resized and deferred.pixels.shape == (5, 3, 64, 64)
    assert eager.resized and eager.failed == deferred.failed == [(5, "bad")]
    torch.testing.assert_close(
        resize_crop(deferred.pixels, default_preprocess()), eager.pixels, rtol=0, atol=0
    )
    mixed = items[:2] + [(9, decode(pattern_image(0, 9, size=80)), "")]
    handed_over = Collate(default_preprocess(), defer_resize=True)(mixed)
    assert handed_over.pixels is None
    assert [tuple(image.shape) for image in handed_over.unstacked] == [(3, 64, 64)] * 2 + [
        (3, 80, 80)
    ]
    cpu = torch.device("cpu")
    crops, refused = crops_on_device(handed_over.unstacked, default_preprocess(), cpu)
    assert refused == []
    torch.testing.assert_close(
        crops,
        Collate(default_preprocess(), defer_resize=False)(mixed).pixels,
        rtol=0,
        atol=0,
    )
