"""torchrun-sharded extraction writes what one process writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import extract_features, write_tiny_imagenet
from extract import store
from extract.dataset import Classes, Manifest
from extract.distributed import rank_path, shard
from extract.errors import UserError
from extract.parts import merge
from extract.store import part_path

REPO = Path(__file__).resolve().parents[1]


def test_shards_are_contiguous_batch_aligned_and_cover_everything():
    manifest = Manifest("train", [f"{i}.jpg" for i in range(23)], list(range(23)))
    for world in (1, 2, 3, 5):
        slices = [shard(manifest, rank, world, batch_size=4) for rank in range(world)]
        assert sum((s.paths for s in slices), []) == manifest.paths
        sizes = [len(s.paths) for s in slices]
        assert all(size % 4 == 0 for size in sizes[:-1])


def test_merge_refuses_a_missing_or_incomplete_part(tmp_path, features_file):
    out = tmp_path / "out.h5.part"
    with pytest.raises(UserError, match="missing.h5: feature file not found"):
        merge([tmp_path / "missing.h5"], out, Classes(["a"], ["a"]), [])
    incomplete = tmp_path / "rank1.h5"
    shutil.copy(features_file, incomplete)
    with h5py.File(incomplete, "r+") as file:
        file.attrs["complete"] = False
    with store.open_complete(features_file) as file:
        classes = store.read_classes(file)
        manifests = []
        for split in store.splits(file):
            arrays = store.read_split(file, split)
            manifests.append(Manifest(split, arrays.paths, arrays.labels.tolist()))
    with pytest.raises(UserError, match=re.escape(f"{incomplete}: incomplete feature file")):
        merge([features_file, incomplete], out, classes, manifests)
    assert not out.exists()
    # The control: the same two parts, both complete, merge.
    with merge([features_file, features_file], out, classes, manifests) as merged:
        assert merged["train"].attrs["rows"] == 2 * len(manifests[0].paths)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(tmp_path, weights_file):
    data = write_tiny_imagenet(tmp_path / "data", train_per_class=7, val_per_class=3)
    broken = data / "train/n01629819/images/broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    single = extract_features(data, tmp_path / "single.h5", weights=str(weights_file), batch_size=4)
    out = tmp_path / "sharded.h5"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    process = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "-m",
            "extract",
            "--data",
            str(data),
            "--out",
            str(out),
            "--weights",
            str(weights_file),
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",  # as the single run; two ranks cannot share one GPU under NCCL
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr
    assert "extracted 30 images, 1 failed" in process.stdout
    assert not part_path(out).exists() and not rank_path(out, 0, 2).exists()
    with h5py.File(out) as got, h5py.File(single) as expected:
        for key, value in expected.attrs.items():
            assert got.attrs[key] == value, key
        for split in ("train", "val"):
            for name in ("features", "labels", "paths", "failed"):
                np.testing.assert_array_equal(got[split][name][()], expected[split][name][()])
            for key in ("rows", "next_index", "manifest_sha256", "manifest_size"):
                assert got[split].attrs[key] == expected[split].attrs[key]
        for name in ("wnids", "names"):
            assert list(got["classes"][name][()]) == list(expected["classes"][name][()])
