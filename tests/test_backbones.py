"""Backbones other than AlexNet: every stored row is torchvision's own network cut at the same node
and fed by the weights' own transforms(); the file, head, live and export carry any backbone; a
file's damaged chunk is one line naming file, split and rows; files written before still read.

All on the CPU in fp32, with random weights saved to files (no pretrained weights are at hand).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from test_head import assert_one_line_error, cli, train_cli
from torchvision.models import get_model, get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor

from conftest import (
    WNIDS,
    cache_weights,
    extract_features,
    pattern_image,
    video_frames,
    write_lossless_video,
    write_tiny_imagenet,
)
from extract import __main__ as extract_main
from extract import backbone, store
from extract.errors import UserError
from extract.preprocess import normalize, to_uint8
from head import checkpoint, evaluate
from head.model import imagenet_wnids
from live import __main__ as live_main
from live import export, model

RELATIVE = 1e-3  # of the largest reference value: fp32 on the CPU, PIL vs uint8 tensor resizing
SIZES = ((64, 64), (300, 200), (97, 130))  # enlarged, shrunk, odd and portrait


@pytest.fixture(scope="session")
def architecture_weights(tmp_path_factory):
    """name -> a file of that network's randomly initialised weights, made once per session."""
    made: dict[str, Path] = {}

    def weights(name: str) -> Path:
        if name not in made:
            torch.manual_seed(7)
            made[name] = tmp_path_factory.mktemp("weights") / f"{name}.pth"
            torch.save(get_model(name, weights=None).state_dict(), made[name])
        return made[name]

    return weights


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of a few JPEG files of different sizes and shapes."""
    root = tmp_path_factory.mktemp("photos")
    for label, name in enumerate(("daisy", "tulip")):
        (root / name).mkdir()
        for index, (width, height) in enumerate(SIZES):
            image = pattern_image(label, index, size=max(width, height)).resize((width, height))
            image.save(root / name / f"{index}.jpg", quality=95)
    return root


def reference_features(name: str, weights_file: Path, node: str, files: list[Path]) -> np.ndarray:
    """The plain torchvision way: the model cut by create_feature_extractor, fed by the default
    weights' transforms() on PIL images; spatial or token outputs averaged to a vector."""
    network = get_model(name, weights=None)
    network.load_state_dict(torch.load(weights_file, weights_only=True))
    cut = create_feature_extractor(network.eval(), return_nodes={node: "out"})
    transform = get_model_weights(name).DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in files])
    with torch.no_grad():
        output = cut(batch)["out"]
    pooled = {2: (), 3: (1,), 4: (2, 3)}[output.ndim]
    return (output.mean(pooled) if pooled else output).numpy()


def assert_rows_match(stored: np.ndarray, reference: np.ndarray) -> None:
    assert stored.shape == reference.shape
    error = np.abs(stored.astype(np.float64) - reference).max() / np.abs(reference).max()
    assert error <= RELATIVE, f"largest difference {error:.2e} of the largest value"


@pytest.mark.parametrize(
    "name, node, dim",
    [
        ("resnet18", "flatten", 512),
        ("efficientnet_b0", "flatten", 1280),  # bicubic
        ("mobilenet_v3_small", "classifier.1", 1024),
        ("regnet_y_400mf", "flatten", 440),
        ("resnet18", "layer3", 256),  # (N, 256, H, W), averaged over H and W
    ],
)
def test_every_stored_row_is_torchvision_cut_at_the_node_on_the_weights_transforms(
    photos, tmp_path, architecture_weights, name, node, dim
):
    weights = architecture_weights(name)
    out = extract_features(
        photos,
        tmp_path / "f.h5",
        backbone=name,
        node=None if node != "layer3" else node,
        weights=str(weights),
        store_dtype="float32",
    )
    with store.open_complete(out) as file:
        arrays = store.read_split(file, "train")
        attrs = store.read_attrs(file)
    assert (attrs["backbone"], attrs["node"], attrs["feature_dim"]) == (name, node, dim)
    default = get_model_weights(name).DEFAULT.transforms()
    recorded = json.loads(attrs["preprocess"])
    assert recorded["resize_size"] == default.resize_size[0]
    assert recorded["interpolation"] == default.interpolation.value
    reference = reference_features(name, weights, node, [photos / p for p in arrays.paths])
    assert_rows_match(arrays.features, reference)


@pytest.mark.slow
def test_vit_b_16_rows_are_the_class_token_after_the_final_norm(
    photos, tmp_path, architecture_weights
):
    weights = architecture_weights("vit_b_16")
    out = extract_features(
        photos, tmp_path / "vit.h5", backbone="vit_b_16", weights=str(weights), batch_size=3
    )
    with store.open_complete(out) as file:
        arrays = store.read_split(file, "train")
        assert store.read_attrs(file)["node"] == "getitem_5"
    network = get_model("vit_b_16", weights=None)
    network.load_state_dict(torch.load(weights, weights_only=True))
    cut = create_feature_extractor(network.eval(), return_nodes={"encoder.ln": "tokens"})
    transform = get_model_weights("vit_b_16").DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(photos / p).convert("RGB")) for p in arrays.paths])
    with torch.no_grad():
        class_token = cut(batch)["tokens"][:, 0].numpy()
    assert_rows_match(arrays.features.astype(np.float32), class_token)


@pytest.mark.parametrize(
    "name", ["alexnet", "resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"]
)
def test_the_default_node_is_what_the_imagenet_classifier_reads(name):
    frozen = backbone.build(name, "random")
    classifier = backbone.imagenet_classifier(frozen.network)
    seen = []
    hook = classifier.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        frozen.network(images)
        features = frozen.extractor(images)
    hook.remove()
    assert features.shape == (2, frozen.feature_dim) == (2, classifier.in_features)
    torch.testing.assert_close(features, seen[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, size", [("efficientnet_b0", (300, 200)), ("swin_t", (64, 64)), ("resnet50", (97, 130))]
)
def test_our_uint8_preprocessing_follows_the_weights_transforms_on_pil_images(name, size):
    """Bilinear and bicubic, enlarging and shrinking: at most one or two levels of 255 apart."""
    record = get_model_weights(name).DEFAULT
    params = backbone.preprocess_of(record)
    image = pattern_image(1, 3, size=max(size)).resize(size)
    ours = normalize(to_uint8(image, params).unsqueeze(0))[0]
    reference = record.transforms()(image)
    assert ours.shape == reference.shape == (3, params.crop_size, params.crop_size)
    levels = (ours - reference).abs() * torch.tensor(params.std).view(3, 1, 1) * 255
    assert levels.max() <= 2.01 and levels.mean() < 0.05


def test_a_network_without_a_linear_classifier_needs_a_node(tmp_path, capsys):
    data = write_tiny_imagenet(tmp_path / "data", train_per_class=1, val_per_class=0)
    argv = ["--data", data, "--out", tmp_path / "f.h5", "--backbone", "squeezenet1_0"]
    argv += ["--weights", "random", "--workers", "0", "--no-progress", "--splits", "train"]
    status, _, err = cli(extract_main, argv, capsys)
    assert_one_line_error(status, err, "squeezenet1_0 has no Linear classifier", "--node")
    status, out, _ = cli(extract_main, [*argv, "--node", "features.12.cat"], capsys)
    assert status == 0 and "extracted 3 images" in out
    with store.open_complete(tmp_path / "f.h5") as file:
        assert store.feature_dim(file) == 512


def test_list_nodes_marks_the_default_and_unknown_names_are_one_line(tmp_path, capsys):
    status, out, _ = cli(extract_main, ["--backbone", "resnet18", "--list-nodes"], capsys)
    assert status == 0 and "flatten  (default)" in out.splitlines() and "layer3" in out
    status, out, _ = cli(extract_main, ["--list-backbones"], capsys)
    assert status == 0 and {"alexnet", "vit_b_16", "convnext_tiny"} <= set(out.split())
    data = write_tiny_imagenet(tmp_path / "data", train_per_class=1, val_per_class=0)
    for argv, message in (
        (["--backbone", "resnet19"], "--backbone resnet19: not a torchvision"),
        (["--backbone", "resnet18", "--node", "layer9", "--weights", "random"], "not a node of"),
        (["--backbone", "resnet18", "--weights", "IMAGENET9K"], "IMAGENET1K_V1"),
    ):
        argv = ["--data", data, "--out", tmp_path / "f.h5", "--splits", "train", *argv]
        status, _, err = cli(extract_main, argv, capsys)
        assert_one_line_error(status, err, message)


def test_weights_files_are_checked_against_the_architecture(tmp_path, weights_file, capsys):
    data = write_tiny_imagenet(tmp_path / "data", train_per_class=1, val_per_class=0)
    argv = ["--data", data, "--out", tmp_path / "f.h5", "--backbone", "resnet18"]
    argv += ["--splits", "train", "--weights", weights_file]
    status, _, err = cli(extract_main, argv, capsys)
    assert_one_line_error(status, err, str(weights_file), "not a torchvision resnet18 state_dict")


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, architecture_weights):
    """resnet18 features of a tiny dataset, and a head trained on them for two epochs."""
    root = tmp_path_factory.mktemp("resnet")
    data = write_tiny_imagenet(root / "data")
    features = extract_features(
        data, root / "f.h5", backbone="resnet18", weights=str(architecture_weights("resnet18"))
    )
    return data, features


def test_head_trains_resumes_and_evaluates_on_resnet_features(resnet_run, tmp_path, capsys):
    _, features = resnet_run
    assert train_cli(features, tmp_path / "straight", capsys, "--epochs", "3")[0] == 0
    assert train_cli(features, tmp_path / "split", capsys, "--epochs", "2")[0] == 0
    status, out, _ = train_cli(features, tmp_path / "split", capsys, "--epochs", "3", "--resume")
    assert status == 0 and "train 12 x 512 float16" in out
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")
    split = checkpoint.load(tmp_path / "split" / "last.pt")
    assert straight.weight.shape == (3, 512)
    torch.testing.assert_close(split.layer, straight.layer, rtol=0, atol=0)
    status, out, _ = cli(
        evaluate, ["--model", tmp_path / "straight", "--features", features], capsys
    )
    assert status == 0 and "val: 6 images" in out


def test_live_and_export_rebuild_the_resnet_from_the_checkpoint(resnet_run, tmp_path, capsys):
    data, features = resnet_run
    assert train_cli(features, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    classifier = model.from_checkpoint(tmp_path / "model")
    with store.open_complete(features) as file:
        arrays = store.read_split(file, "val")
    head = checkpoint.load(tmp_path / "model").layer
    pixels = torch.stack([to_uint8(Image.open(data / p), classifier.params) for p in arrays.paths])
    with torch.inference_mode():
        logits = classifier.network(normalize(pixels, classifier.params))
    expected = torch.from_numpy(arrays.features).float() @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=5e-3 * expected.abs().max().item())

    video = write_lossless_video(tmp_path / "clip.avi", video_frames(3))
    log = tmp_path / "live.jsonl"
    argv = ["--model", tmp_path / "model", "--source", video, "--no-display", "--log", log]
    status, out, _ = cli(live_main, argv, capsys)
    assert status == 0 and len(log.read_text().splitlines()) == 3

    assert export.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "r.pt2")]) == 0
    extra = {"live.json": ""}
    program = torch.export.load(tmp_path / "r.pt2", extra_files=extra).module()
    assert json.loads(extra["live.json"])["weights_sha256"] == classifier.weights_sha256
    images = normalize(pixels, classifier.params)
    with torch.no_grad():
        torch.testing.assert_close(program(images), logits, rtol=1e-5, atol=1e-5)


def test_init_classifier_starts_from_the_backbones_imagenet_rows(
    tmp_path, architecture_weights, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cache_weights("resnet18", architecture_weights("resnet18"))
    data = write_tiny_imagenet(tmp_path / "data", train_per_class=1, val_per_class=1)
    pretrained = extract_features(data, tmp_path / "f.h5", backbone="resnet18", weights="imagenet")
    status, _, _ = train_cli(
        pretrained, tmp_path / "m", capsys, "--init", "classifier", "--epochs", "0"
    )
    assert status == 0
    rows = [imagenet_wnids().index(wnid) for wnid in WNIDS]
    fc = backbone.load_network("resnet18", "imagenet").fc
    untrained = checkpoint.load(tmp_path / "m").layer
    torch.testing.assert_close(untrained["weight"], fc.weight[rows], rtol=0, atol=0)
    torch.testing.assert_close(untrained["bias"], fc.bias[rows], rtol=0, atol=0)

    status, _, err = train_cli(pretrained, tmp_path / "fc8", capsys, "--init", "fc8")
    assert_one_line_error(status, err, "AlexNet's name", "--init classifier")
    inner = extract_features(
        data, tmp_path / "l3.h5", backbone="resnet18", weights="imagenet", node="layer3"
    )
    status, _, err = train_cli(inner, tmp_path / "l3", capsys, "--init", "classifier")
    assert_one_line_error(status, err, "resnet18 flatten", "layer3")


def flip_bytes_in_chunk(path: Path, split: str, row: int) -> None:
    """Invert a few bytes of `row`'s features inside its HDF5 chunk, as a failing disk would."""
    with h5py.File(path, "r") as file:
        dataset = file[split]["features"]
        chunk_rows, width = dataset.chunks
        chunk = dataset.id.get_chunk_info_by_coord((row - row % chunk_rows, 0))
        offset = chunk.byte_offset + (row % chunk_rows) * width * dataset.dtype.itemsize + 10
    with open(path, "r+b") as stream:
        stream.seek(offset)
        original = stream.read(4)
        stream.seek(offset)
        stream.write(bytes(b ^ 0xFF for b in original))


def test_a_damaged_chunk_is_one_line_naming_file_split_and_rows(features_file, tmp_path, capsys):
    assert train_cli(features_file, tmp_path / "model", capsys, "--epochs", "1")[0] == 0
    flip_bytes_in_chunk(features_file, "train", 5)
    flip_bytes_in_chunk(features_file, "val", 2)
    for extra in ((), ("--stream",)):
        status, _, err = train_cli(features_file, tmp_path / "new", capsys, *extra)
        assert_one_line_error(
            status, err, str(features_file), "train/features rows 0-11", "damaged"
        )
    argv = ["--model", tmp_path / "model", "--features", features_file]
    status, _, err = cli(evaluate, argv, capsys)
    assert_one_line_error(status, err, str(features_file), "val/features rows 0-5", "damaged")
    with store.open_complete(features_file) as file, pytest.raises(UserError, match="rows 0-5"):
        store.read_split(file, "val")
    with store.open_complete(features_file) as file:  # the test split is intact and reads
        assert store.read_split(file, "test").features.shape == (2, 4096)


def test_a_file_written_before_feature_dim_and_checksums_still_reads(
    features_file, tmp_path, capsys
):
    """Old files: no feature_dim attribute, features without Fletcher-32."""
    old = tmp_path / "old.h5"
    with h5py.File(features_file, "r") as new, h5py.File(old, "w") as file:
        for key, value in new.attrs.items():
            if key != "feature_dim":
                file.attrs[key] = value
        for name in new:
            new.copy(name, file)
        for split in store.splits(file):
            rows = file[split]["features"][()]
            del file[split]["features"]
            file[split].create_dataset(
                "features", data=rows, maxshape=(None, 4096), chunks=(128, 4096)
            )
            assert not file[split]["features"].fletcher32
    with store.open_complete(old) as file:
        assert "feature_dim" not in file.attrs and store.feature_dim(file) == 4096
    status, out, _ = train_cli(old, tmp_path / "model", capsys, "--epochs", "1")
    assert status == 0 and "x 4096 float16" in out
    status, _, _ = cli(evaluate, ["--model", tmp_path / "model", "--features", old], capsys)
    assert status == 0
    with store.open_complete(features_file) as file:
        assert file["train"]["features"].fletcher32 and file.attrs["feature_dim"] == 4096


def test_old_checkpoints_and_files_agree_with_new_ones_on_alexnet(features_file):
    """The AlexNet provenance is what it was: the node is classifier.5 and the preprocessing
    JSON is unchanged, so checkpoints trained before still match files extracted now."""
    with store.open_complete(features_file) as file:
        provenance = store.provenance(file)
    assert provenance["node"] == "classifier.5" and provenance["backbone"] == "alexnet"
    assert provenance["preprocess"] == (
        '{"antialias": true, "crop_size": 224, "interpolation": "bilinear", "mean": '
        '[0.485, 0.456, 0.406], "resize_size": 256, "std": [0.229, 0.224, 0.225]}'
    )


def test_imagenet_mode_with_another_backbone_is_torchvisions_whole_network(
    architecture_weights, tmp_path, capsys
):
    """`live --imagenet --backbone NAME`: the cut network and the classifier it reads, stitched,
    give the logits of torchvision's own network, named by the weights' categories."""
    weights = architecture_weights("resnet18")
    classifier = model.imagenet(str(weights), architecture="resnet18")
    network = get_model("resnet18", weights=None)
    network.load_state_dict(torch.load(weights, weights_only=True))
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = network.eval()(images)
        actual = classifier.network(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert classifier.names == get_model_weights("resnet18").DEFAULT.meta["categories"]
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(2))
    log = tmp_path / "imagenet.jsonl"
    argv = ["--imagenet", "--backbone", "resnet18", "--weights", weights]
    argv += ["--source", video, "--no-display", "--log", log]
    status, _, _ = cli(live_main, argv, capsys)
    assert status == 0 and len(log.read_text().splitlines()) == 2
