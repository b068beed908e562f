"""Messy data, full disks, concurrent runs and hostile files: documented behaviour, no surprises."""

from __future__ import annotations

import ast
import fcntl
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import cache_weights, extract_features, pattern_image
from extract import store
from extract.dataset import (
    Classes,
    Manifest,
    read_classes,
    read_manifest,
    read_val_annotations,
    read_words,
)
from extract.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN = "train/n01443537/images"


def extracted(root: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    out = extract_features(root, tmp_path / "f.h5", splits=["train"])
    with store.open_complete(out) as file:
        return store.read_split(file, "train").paths, dict(store.read_failed(file, "train"))


def test_png_named_jpeg_is_read_by_content(tiny_imagenet, tmp_path):
    pattern_image(0, 5).save(tiny_imagenet / TRAIN / "actually_png.JPEG", format="PNG")
    paths, failed = extracted(tiny_imagenet, tmp_path)
    assert f"{TRAIN}/actually_png.JPEG" in paths and not failed


def test_decompression_bomb_is_skipped_and_listed(tiny_imagenet, tmp_path):
    Image.new("1", (10_000, 10_000)).save(tiny_imagenet / TRAIN / "bomb.png")
    paths, failed = extracted(tiny_imagenet, tmp_path)
    assert "DecompressionBomb" in failed[f"{TRAIN}/bomb.png"]
    assert f"{TRAIN}/bomb.png" not in paths


def test_symlink_loop_is_skipped_and_listed(tiny_imagenet, tmp_path):
    folder = tiny_imagenet / TRAIN
    os.symlink(folder / "loop_b.JPEG", folder / "loop_a.JPEG")
    os.symlink(folder / "loop_a.JPEG", folder / "loop_b.JPEG")
    os.symlink(folder, folder / "self")  # a folder link: not followed, so no endless walk
    paths, failed = extracted(tiny_imagenet, tmp_path)
    assert set(failed) == {f"{TRAIN}/loop_a.JPEG", f"{TRAIN}/loop_b.JPEG"}
    assert len(paths) == 12


def test_non_utf8_and_very_long_names_are_extracted(tiny_imagenet, tmp_path):
    folder = os.fsencode(tiny_imagenet / TRAIN)
    pattern_image(0, 5).save(os.fsdecode(folder + b"/caf\xe9.JPEG"))
    long_name = "x" * 250 + ".JPEG"
    pattern_image(0, 6).save(tiny_imagenet / TRAIN / long_name)
    paths, failed = extracted(tiny_imagenet, tmp_path)
    assert not failed
    assert f"{TRAIN}/caf\\xe9.JPEG" in paths and f"{TRAIN}/{long_name}" in paths


@pytest.mark.parametrize("line", ["no tabs here", "\tn01443537\t0", "val_0_0.JPEG\t\t0"])
def test_malformed_val_annotation_line_names_file_and_line(tiny_imagenet, line):
    annotations = tiny_imagenet / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + line + "\n")
    with pytest.raises(UserError, match=r"val_annotations.txt:7: expected"):
        read_manifest(tiny_imagenet, "val", read_classes(tiny_imagenet))


def test_malformed_words_line_and_duplicate_wnids(tiny_imagenet):
    words = tiny_imagenet / "words.txt"
    words.write_text(words.read_text() + "n01443537 goldfish without a tab\n")
    with pytest.raises(UserError, match=r"words.txt:5: expected"):
        read_classes(tiny_imagenet)
    words.write_text("")
    wnids = tiny_imagenet / "wnids.txt"
    wnids.write_text(wnids.read_text() + "n01443537\n")
    with pytest.raises(UserError, match="n01443537 is listed more than once"):
        read_classes(tiny_imagenet)


def test_second_run_on_the_same_output_is_refused(tiny_imagenet, tmp_path):
    out = tmp_path / "f.h5"
    with open(out.with_name("f.h5.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another extract run is writing"):
            extract_features(tiny_imagenet, out)
    assert not out.exists() and not store.part_path(out).exists()


def test_a_run_killed_while_creating_its_file_leaves_nothing_half_made(tmp_path, monkeypatch):
    """The empty file is built aside and renamed: a crash mid-way leaves no unreadable .part."""
    part = tmp_path / "f.h5.part"
    manifest = Manifest(split="train", paths=["a.JPEG"], labels=[0])
    classes = Classes(wnids=["n0"], names=["zero"])
    attrs = {"store_dtype": "float16", "feature_dim": 4096}

    def crash(file, *args):
        # Writes into the file behind store's back on purpose: a skeleton left half-made.
        file.attrs["format"] = store.FORMAT
        raise KeyboardInterrupt  # stands in for the kill, after part of the file is written

    monkeypatch.setattr(store, "write_skeleton", crash)
    with pytest.raises(KeyboardInterrupt):
        store.create(part, attrs, classes, [manifest], flip=False)
    assert not part.exists()
    monkeypatch.undo()
    with store.create(part, attrs, classes, [manifest], flip=False) as file:
        assert file["train"].attrs["rows"] == 0 and file.mode == "r+"


def limit_file_size():
    """A disk that fills up: writes past 3.5 MB fail with EFBIG instead of killing us."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_500_000, 3_500_000))


def test_full_disk_gives_clear_error_and_resume_completes(tiny_imagenet, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    args = [
        sys.executable,
        "-m",
        "extract",
        "--data",
        str(tiny_imagenet),
        "--out",
        str(out),
        "--weights",
        str(weights_file),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--no-progress",
        "--device",
        "cpu",  # as the reference it is compared with, bit for bit
    ]
    full = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr
    assert full.stderr.startswith(f"error: {store.part_path(out)}: writing failed")
    assert len(full.stderr.strip().splitlines()) == 1, full.stderr
    assert "file size limit" in full.stderr
    assert not out.exists(), "nothing may claim to be complete"
    with h5py.File(store.part_path(out)) as part:
        assert not part.attrs["complete"]
        assert 0 < part["train"].attrs["rows"] < 12, "the rows written before the error stay"
    resumed = subprocess.run([*args, "--resume"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    reference = extract_features(
        tiny_imagenet, tmp_path / "reference.h5", weights=str(weights_file), batch_size=2
    )
    with h5py.File(out) as got, h5py.File(reference) as expected:
        for split in ("train", "val"):
            np.testing.assert_array_equal(
                got[split]["features"][()], expected[split]["features"][()]
            )


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_file_with_pickled_code_is_refused_and_runs_nothing(tiny_imagenet, tmp_path):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Payload(marker)}, weights)
    with pytest.raises(UserError, match="not a readable weights file"):
        extract_features(tiny_imagenet, tmp_path / "f.h5", weights=str(weights))
    assert not marker.exists()


def test_pretrained_weights_in_the_torch_cache_with_pickled_code_run_nothing(
    tiny_imagenet, tmp_path, weights_file, monkeypatch
):
    """torchvision reads its own cache with weights_only=False; a file planted there under the
    pretrained weights' name is read safely first and refused. The genuine one still loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    marker = tmp_path / "code-ran"
    cached = cache_weights("alexnet", tmp_path / "evil.pth")
    torch.save({"features.0.weight": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=f"{cached}: not a readable weights file"):
        extract_features(tiny_imagenet, tmp_path / "f.h5", weights="imagenet")
    assert not marker.exists()
    # The control: the same place holding plain weights.
    cached.unlink()
    cache_weights("alexnet", weights_file)
    extract_features(tiny_imagenet, tmp_path / "f.h5", weights="imagenet", splits=["val"])


LOADERS = ("torch.load", "torch.hub.load_state_dict_from_url")


def loader_calls(source: str) -> dict[str, bool]:
    """Calls of `torch.load` (under any import name), torch.hub's loader and `get_state_dict` of
    torchvision weights (which reaches it) -> whether the call passes ``weights_only=True``."""
    tree = ast.parse(source)
    names = {}  # local name -> what it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            head, _, rest = ast.unparse(node.func).partition(".")
            called = ".".join(filter(None, (names.get(head, head), rest)))
            if called in LOADERS or called.endswith(".get_state_dict"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls[f"line {node.lineno}: {ast.unparse(node)}"] = (
                    keywords.get("weights_only") == "True"
                )
    return calls


def test_every_torch_load_of_the_packages_is_weights_only():
    """A static check of extract/, head/ and live/: whatever name torch's loader is imported
    under, each call passes weights_only=True (so loading can never run pickled code)."""
    calls = {}
    for package in ("extract", "head", "live"):
        for path in sorted((REPO / package).glob("*.py")):
            calls.update({f"{path.name} {c}": s for c, s in loader_calls(path.read_text()).items()})
    assert len(calls) >= 2, "the packages load weights and checkpoints somewhere"
    assert [call for call, safe in calls.items() if not safe] == []
    for unsafe in (
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "from torch import load as read\nread(path, map_location='cpu')",
        "import torch as t\nt.load(path)",
        "from torch import hub\nhub.load_state_dict_from_url(url)",
        "weights.get_state_dict(progress=False)",
    ):
        assert list(loader_calls(unsafe).values()) == [False], unsafe


lines = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(lines, max_size=8))
def test_annotation_and_words_parsers_fail_only_with_user_errors(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("parse") / "file.txt"
    path.write_text("\n".join(rows), encoding="utf-8")
    for parse in (read_val_annotations, read_words):
        try:
            parsed = parse(path)
        except UserError as error:
            assert str(path) in str(error)
        else:
            assert all(key and key == key.strip() for key in parsed)


names = st.text(
    alphabet=st.characters(min_codepoint=48, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.integers(0, 300), failed=st.integers(0, 3), name=names, seed=st.integers(0, 2**31))
def test_store_round_trips_what_was_appended(tmp_path_factory, rows, failed, name, seed):
    rng = np.random.default_rng(seed)
    features = rng.random((rows, 4096), dtype=np.float32).astype(np.float16)
    labels = rng.integers(-1, 3, rows).tolist()
    paths = [f"{name}/{i}.JPEG" for i in range(rows)]
    bad = [(f"{name}/bad{i}.JPEG", f"reason {i}") for i in range(failed)]
    manifest = Manifest("train", paths + [p for p, _ in bad], labels + [0] * failed)
    attrs = dict.fromkeys(
        (*store.PROVENANCE_KEYS, "precision", "torch_version", "torchvision_version"), "x"
    )
    path = tmp_path_factory.mktemp("store") / "f.h5"
    with store.create(
        path,
        {**attrs, "store_dtype": "float16", "feature_dim": 4096},
        Classes([name], [name]),
        [manifest],
        flip=False,
    ) as file:
        for start in range(0, rows, 128):
            stop = min(start + 128, rows)
            store.append(
                file["train"],
                features[start:stop],
                None,
                labels[start:stop],
                paths[start:stop],
                [],
                stop,
            )
        store.append(file["train"], None, None, [], [], bad, len(manifest.paths))
        store.mark_complete(file)
    with store.open_complete(path) as file:
        arrays = store.read_split(file, "train")
        np.testing.assert_array_equal(arrays.features.reshape(rows, 4096), features)
        assert arrays.labels.tolist() == labels and arrays.paths == paths
        assert store.read_failed(file, "train") == bad
        assert store.read_classes(file) == Classes([name], [name])


def test_paths_read_from_a_feature_file_are_never_written_to(tiny_imagenet, tmp_path, weights_file):
    """Train, evaluate and run live from a folder where every stored path would resolve:
    nothing appears there and the dataset is untouched."""
    from test_extract_features import tree_digest

    out = extract_features(
        tiny_imagenet, tmp_path / "f.h5", weights=str(weights_file), splits=["train", "val", "test"]
    )
    before = tree_digest(tiny_imagenet)
    listing = sorted(p.relative_to(tiny_imagenet) for p in tiny_imagenet.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DISPLAY", None)
    model = tmp_path / "model"
    for command in (
        [
            "head.train",
            "--features",
            str(out),
            "--save",
            str(model),
            "--epochs",
            "1",
            "--no-progress",
        ],
        [
            "head.evaluate",
            "--model",
            str(model),
            "--features",
            str(out),
            "--out",
            str(tmp_path / "report"),
        ],
        [
            "live",
            "--model",
            str(model),
            "--source",
            str(tiny_imagenet / "test" / "images"),
            "--no-display",
            "--log",
            str(tmp_path / "live.jsonl"),
        ],
    ):
        done = subprocess.run(
            [sys.executable, "-m", *command],
            cwd=tiny_imagenet,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    assert tree_digest(tiny_imagenet) == before
    assert sorted(p.relative_to(tiny_imagenet) for p in tiny_imagenet.rglob("*")) == listing


def test_a_file_system_that_cannot_reserve_blocks_still_extracts(
    tiny_imagenet, tmp_path, monkeypatch
):
    """CPU fp32. Some network and FUSE file systems answer posix_fallocate with EOPNOTSUPP:
    that is no full disk, so the run falls back to reading the free space and completes with
    the rows of an ordinary run."""
    import errno

    reference = extract_features(tiny_imagenet, tmp_path / "reference.h5", splits=["train"])
    calls = []

    def unsupported(fd, offset, length):
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    out = extract_features(tiny_imagenet, tmp_path / "features.h5", splits=["train"])
    assert calls, "the reservation was not tried"
    with store.open_complete(reference) as expected, store.open_complete(out) as got:
        np.testing.assert_array_equal(
            store.read_split(got, "train").features, store.read_split(expected, "train").features
        )
