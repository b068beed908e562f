"""Datasets where they live: a folder, a CSV manifest, WebDataset tar shards and Parquet files
give the rows a folder gives; bad samples are failed rows, bad sources one-line errors.

All on the CPU in fp32 with random AlexNet weights; rows are compared bit for bit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_extract_cli import assert_one_line_error, rows_written, rows_written_so_far, run_main

import extract
from conftest import extract_features, pattern_image
from extract import store
from extract.distributed import shard
from extract.sources import expand, read_sources

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")


def write_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """An ImageFolder dataset of real JPEG files: ``<split>/<class>/<n>.jpg``."""
    for split, count, first in (("train", train_per_class, 0), ("val", val_per_class, 100)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pattern_image(label, first + index).save(folder / f"{index:03d}.jpg", quality=90)
    return root


def samples_of(root: Path, split: str) -> list[tuple[str, str, bytes]]:
    """(relative path, class name, JPEG bytes) of a folder's split, in the folder's row order."""
    found = []
    for name in CLASSES:
        for path in sorted((root / split / name).iterdir()):
            found.append((f"{split}/{name}/{path.name}", name, path.read_bytes()))
    return found


def write_csv(root: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        for split in ("train", "val"):
            for path, label, _ in samples_of(root, split):
                writer.writerow([os.path.relpath(root / path, out.parent), label, split])
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: list[tuple[str, str, bytes]], pattern: str, per_shard: int, label: str = "txt"
) -> list[Path]:
    """WebDataset shards as img2dataset writes them: ``<key>.jpg`` and ``<key>.<label>``."""
    shards = []
    for number, first in enumerate(range(0, len(samples), per_shard)):
        path = Path(pattern.format(number))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for index, (_, name, data) in enumerate(samples[first : first + per_shard]):
                key = f"{number:05d}{index:04d}"
                add_member(tar, f"{key}.jpg", data)
                value = CLASSES.index(name) if label == "cls" else name
                add_member(tar, f"{key}.{label}", str(value).encode())
                add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
        shards.append(path)
    return shards


def write_parquet(samples: list[tuple[str, str, bytes]], path: Path, row_group: int) -> Path:
    """Hugging Face's image layout: a ``{"bytes", "path"}`` struct and a label column."""
    table = pa.table(
        {
            "image": [{"bytes": data, "path": relative} for relative, _, data in samples],
            "label": [name for _, name, _ in samples],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return path


def rows(path: Path) -> dict:
    with h5py.File(path) as file:
        return {
            split: (file[split]["features"][()], file[split]["labels"][()])
            for split in store.splits(file)
        } | {"classes": list(file["classes/wnids"].asstr()[()])}


def assert_same_rows(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert got["classes"] == expected["classes"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split][0], expected[split][0])
        np.testing.assert_array_equal(got[split][1], expected[split][1])


def test_folder_csv_shards_and_parquet_give_identical_rows_in_the_same_order(
    tmp_path, weights_file
):
    """CPU fp32, bit for bit: the same 18 JPEG files as a dataset folder (the reference), an
    ImageFolder per split, a CSV, tar shards and Parquet files give the same features, labels
    and classes in the same order. The control: the CSV with two rows swapped does not."""
    data = write_folder(tmp_path / "data")
    train, val = samples_of(data, "train"), samples_of(data, "val")
    manifest = write_csv(data, tmp_path / "lists" / "all.csv")
    write_shards(train, str(tmp_path / "shards/train-{:05d}.tar"), per_shard=4)
    write_shards(val, str(tmp_path / "shards/val-{:05d}.tar"), per_shard=4)
    write_parquet(train, tmp_path / "hf/train.parquet", row_group=4)
    write_parquet(val, tmp_path / "hf/val.parquet", row_group=4)

    def extracted(name: str, source) -> dict:
        return rows(
            extract_features(
                source, tmp_path / f"{name}.h5", weights=str(weights_file), batch_size=4
            )
        )

    reference = extracted("folder", data)
    assert reference["train"][0].shape == (12, 4096) and reference["classes"] == list(CLASSES)
    sources = {
        "imagefolder": {"train": str(data / "train"), "val": str(data / "val")},
        "csv": manifest,
        "shards": {
            "train": str(tmp_path / "shards/train-{00000..00002}.tar"),
            "val": str(tmp_path / "shards/val-*.tar"),
        },
        "parquet": {
            "train": str(tmp_path / "hf/train.parquet"),
            "val": str(tmp_path / "hf/val.parquet"),
        },
    }
    for name, source in sources.items():
        assert_same_rows(
            extracted(
                name,
                extract.sources.parse_data(
                    [f"{k}={v}" for k, v in source.items()]
                    if isinstance(source, dict)
                    else [source]
                ),
            ),
            reference,
        )

    with h5py.File(tmp_path / "shards.h5") as file:
        ids = list(file["train/paths"].asstr()[:5])
    assert ids[0] == f"{tmp_path}/shards/train-00000.tar:000000000"
    assert ids[4] == f"{tmp_path}/shards/train-00001.tar:000010000"
    with h5py.File(tmp_path / "parquet.h5") as file:
        assert file["val/paths"].asstr()[5] == f"{tmp_path}/hf/val.parquet:5"

    lines = manifest.read_text().splitlines()
    lines[1], lines[5] = lines[5], lines[1]
    swapped = tmp_path / "lists" / "swapped.csv"
    swapped.write_text("\n".join(lines) + "\n")
    with pytest.raises(AssertionError):
        assert_same_rows(extracted("swapped", swapped), reference)


def test_python_api_takes_the_sources_by_split(tmp_path, weights_file):
    data = write_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    shards = write_shards(samples_of(data, "val"), str(tmp_path / "val-{:02d}.tar"), 2)
    summary = extract.run(
        {"train": data / "train", "val": tmp_path / "val-{00..01}.tar"},
        tmp_path / "f.h5",
        weights=str(weights_file),
        device="cpu",
        workers=0,
        progress=False,
    )
    assert (summary.images, summary.failed) == (9, 0) and len(shards) == 2
    with extract.load(tmp_path / "f.h5") as cache:
        assert cache.wnids == list(CLASSES)
        assert cache["val"].labels.tolist() == [0, 1, 2]


def corrupt_shard(path: Path, samples: list[tuple[str, str, bytes]]) -> None:
    """One of each per-sample fault, then a good sample, then a sample cut off by truncation."""
    (_, _, good), (_, _, other) = samples[0], samples[1]
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a/noimage.txt", b"cat")
        add_member(tar, "a/nolabel.jpg", good)
        add_member(tar, "a/corrupt.jpg", good[: len(good) // 3] + b"\x00" * 50)
        add_member(tar, "a/corrupt.txt", b"cat")
        add_member(tar, "a/badcls.jpg", good)
        add_member(tar, "a/badcls.cls", b"seven")
        add_member(tar, "a/unknown.jpg", good)
        add_member(tar, "a/unknown.txt", b"wolf")
        add_member(tar, "a/good.jpg", good)
        add_member(tar, "a/good.txt", b"cat")
        add_member(tar, "a/cut.txt", b"dog")
        add_member(tar, "a/cut.jpg", other)
    with tarfile.open(path) as tar:
        last = tar.getmember("a/cut.jpg")
    with open(path, "r+b") as stream:  # cut inside the last image, as a copy that died
        stream.truncate(last.offset_data + last.size // 2)


def test_bad_samples_are_failed_rows_with_reasons_and_strict_stops(tmp_path, weights_file, capsys):
    """A sample with no image, with no label, with a corrupt image, an unparsable cls, a label
    that is not a class and one cut by a truncated shard: each is a failed row with its reason
    while the good ones are extracted; --strict stops at the first with one line."""
    data = write_folder(tmp_path / "data", train_per_class=2, val_per_class=0)
    shard_path = tmp_path / "val-0.tar"
    corrupt_shard(shard_path, samples_of(data, "train"))
    out = tmp_path / "f.h5"
    extract_features(
        {"train": str(data / "train"), "val": str(shard_path)}, out, weights=str(weights_file)
    )
    with extract.load(out) as cache:
        val = cache["val"]
        failed = dict(val.failed)
        assert val.paths == [f"{shard_path}:a/good"] and val.labels.tolist() == [0]
    prefix = f"{shard_path}:a/"
    assert set(failed) == {
        prefix + k for k in ("noimage", "nolabel", "corrupt", "badcls", "unknown", "cut")
    }
    assert failed[prefix + "noimage"].startswith("no image member")
    assert failed[prefix + "nolabel"].startswith("no label member")
    assert "invalid literal" in failed[prefix + "badcls"]
    assert failed[prefix + "unknown"] == "label 'wolf' is not a class"
    assert "truncated" in failed[prefix + "cut"]
    assert failed[prefix + "corrupt"].split(":")[0] in ("OSError", "RuntimeError", "SyntaxError")

    code, _, err = run_main(
        [
            "--data", f"train={data / 'train'}", "--data", f"val={shard_path}",
            "--out", str(tmp_path / "strict.h5"), "--weights", str(weights_file),
            "--workers", "0", "--device", "cpu", "--strict", "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert_one_line_error(code, err, f"{prefix}noimage: unreadable image, no image member")
    assert "(and 5 more); --strict stops here" in err


@pytest.mark.parametrize(
    "data, message",
    [
        (["train={root}/missing-{{0..1}}.tar"], "{root}/missing-0.tar: shard not found"),
        (["train={root}/none-*.tar"], "{root}/none-*.tar: the pattern matches no file"),
        (
            ["train={root}/nocolumn.csv"],
            "{root}/nocolumn.csv: no 'label' column (has 'path', 'class'",
        ),
        (
            ["train={root}/nocolumn.parquet"],
            "{root}/nocolumn.parquet: no column 'label' (has image, y;",
        ),
        (["train={root}/a.csv", "train={root}/b.csv"], "--data train=: given twice"),
        (["train={root}/a.csv", "training={root}/b.csv"], "--data training=: unknown split"),
        (["train={root}/notes.md"], "{root}/notes.md: not a folder, a .csv or .tsv manifest"),
        (["train={root}/fake.tar"], "{root}/fake.tar: not an uncompressed tar file"),
    ],
)
def test_a_bad_source_is_one_line_naming_it_and_exit_2(tmp_path, capsys, data, message):
    root = tmp_path
    (root / "nocolumn.csv").write_text("path,class\nx.jpg,cat\n")
    (root / "notes.md").write_text("not data\n")
    (root / "fake.tar").write_bytes(b"\x01" * 2048)
    pq.write_table(pa.table({"image": [b"x"], "y": [1]}), root / "nocolumn.parquet")
    argv = [arg for value in data for arg in ("--data", value.format(root=root))]
    code, _, err = run_main([*argv, "--out", str(tmp_path / "f.h5")], capsys)
    assert_one_line_error(code, err, message.format(root=root))
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.part").exists()


def test_classes_from_a_class_file_or_the_train_labels(tmp_path):
    """Without a class file the classes are the sorted train labels (numbers in numeric order,
    named by their number); with one, a cls index is its line and a name its first field."""
    data = write_folder(tmp_path / "data", train_per_class=1, val_per_class=0)
    samples = samples_of(data, "train")
    numbered = [(path, name, data) for (path, name, data) in samples]
    shards = tmp_path / "s-{:d}.tar"
    with tarfile.open(str(shards).format(0), "w") as tar:
        for key, (label, (_, _, image)) in enumerate(zip((10, 2, 2), numbered)):
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.cls", str(label).encode())
    classes, (train,) = read_sources({"train": str(tmp_path / "s-0.tar")})
    assert classes.wnids == ["2", "10"] and classes.names == ["2", "10"]
    assert train.labels == [1, 0, 0] and train.failures == {}

    class_file = tmp_path / "classes.txt"
    class_file.write_text("n0\tzero\n" + "n1\n" + "n2\ttwo\n")
    classes, (train,) = read_sources({"train": str(tmp_path / "s-0.tar")}, class_file)
    assert classes.wnids == ["n0", "n1", "n2"] and classes.names == ["zero", "n1", "two"]
    assert train.labels == [-1, 2, 2] and train.failures == {0: "label 10 is not a class"}

    listing = tmp_path / "labels.tsv"
    listing.write_text(
        "path\tlabel\n" + "".join(f"{p}\t{n}\n" for p, n in (("x.jpg", "n2"), ("y.jpg", "cat")))
    )
    classes, (train,) = read_sources({"train": str(listing)}, class_file)
    assert train.labels == [2, -1] and train.failures == {1: "label 'cat' is not a class"}


def test_a_csv_path_outside_its_folder_is_read_as_documented(tmp_path, weights_file):
    """A manifest is trusted input: ``..`` and a link out of its folder are read like any path."""
    data = write_folder(tmp_path / "data", train_per_class=1, val_per_class=0)
    lists = tmp_path / "lists"
    lists.mkdir()
    os.symlink(data / "train" / "dog", lists / "link")
    (lists / "train.csv").write_text(
        "path,label\n../data/train/cat/000.jpg,cat\nlink/000.jpg,dog\n"
    )
    out = extract_features(lists / "train.csv", tmp_path / "f.h5", weights=str(weights_file))
    with extract.load(out) as cache:
        assert cache["train"].paths == ["../data/train/cat/000.jpg", "link/000.jpg"]
        assert not cache["train"].failed
    assert "trusted input" in (REPO / "docs" / "inputs.md").read_text()


def test_brace_ranges_keep_their_width_and_order_and_globs_are_sorted(tmp_path):
    assert expand("s-{00008..00011}.tar") == [f"s-{n:05d}.tar" for n in range(8, 12)]
    assert expand("s-{1..3}-{a,b}.tar") == [
        "s-1-a.tar",
        "s-1-b.tar",
        "s-2-a.tar",
        "s-2-b.tar",
        "s-3-a.tar",
        "s-3-b.tar",
    ]
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / name).touch()
    assert expand(f"{tmp_path}/*.tar") == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert expand("plain.tar") == ["plain.tar"]


def test_torchrun_ranks_take_whole_shards_and_batches_do_not_cross_them(tmp_path):
    data = write_folder(tmp_path / "data", train_per_class=3, val_per_class=0)
    write_shards(samples_of(data, "train"), str(tmp_path / "t-{:d}.tar"), per_shard=5)
    _, (train,) = read_sources({"train": str(tmp_path / "t-{0..1}.tar")})
    assert train.units == (0, 5) and len(train.paths) == 9
    assert [list(b) for b in train.batches(0, 4)] == [[0, 1, 2, 3], [4], [5, 6, 7, 8]]
    halves = [shard(train, rank, 2, batch_size=4) for rank in range(2)]
    assert [h.paths for h in halves] == [train.paths[:5], train.paths[5:]]
    assert halves[1].reader_offset == 5 and halves[1].units == (0,)
    assert [name for name, _ in halves[1].reader.read([5])] == [train.paths[5]]
    # The same shards named in a list (relative to it), and Parquet files given as a folder.
    (tmp_path / "shards.txt").write_text("t-0.tar\n\nt-1.tar\n")
    assert read_sources({"train": str(tmp_path / "shards.txt")})[1][0].paths == train.paths
    write_parquet(samples_of(data, "train")[:4], tmp_path / "hf" / "a.parquet", row_group=3)
    write_parquet(samples_of(data, "train")[4:], tmp_path / "hf" / "b.parquet", row_group=3)
    _, (rows,) = read_sources({"train": str(tmp_path / "hf")})
    assert rows.units == (0, 3, 4, 7) and rows.paths[4] == f"{tmp_path}/hf/b.parquet:0"
    # A folder is one unit: its ranks split at batch boundaries, as before.
    classes, (folder,) = read_sources({"train": str(data / "train")})
    assert [len(shard(folder, rank, 2, 4).paths) for rank in range(2)] == [4, 5]


def cli_args(data: list[str], out: Path, weights_file: Path) -> list[str]:
    argv = [arg for value in data for arg in ("--data", value)]
    return argv + [
        "--out", str(out), "--weights", str(weights_file), "--batch-size", "2",
        "--workers", "0", "--store-dtype", "float32", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_resume_after_sigkill_on_shards_and_parquet_matches_uninterrupted_run(
    tmp_path, weights_file, kind
):
    """CPU fp32, bit for bit: killed after some rows are committed, resumed, equal to an
    uninterrupted run, with only the rest recomputed."""
    data = write_folder(tmp_path / "data", train_per_class=12, val_per_class=0)
    train = samples_of(data, "train")
    if kind == "shards":
        write_shards(train, str(tmp_path / "t-{:d}.tar"), per_shard=6)
        source = f"train={tmp_path}/t-{{0..5}}.tar"
    else:
        source = f"train={write_parquet(train, tmp_path / 't.parquet', row_group=6)}"
    reference = tmp_path / "reference.h5"
    done = subprocess.run(
        [sys.executable, "-m", "extract", *cli_args([source], reference, weights_file)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed.h5"
    process = subprocess.Popen(
        [sys.executable, "-m", "extract", *cli_args([source], out, weights_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and rows_written_so_far(store.part_path(out)) < 8:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    written = rows_written(store.part_path(out))
    assert 0 < written < 36
    resumed = subprocess.run(
        [sys.executable, "-m", "extract", *cli_args([source], out, weights_file), "--resume"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"extracted {36 - written} images" in resumed.stdout
    with h5py.File(out) as got, h5py.File(reference) as expected:
        for name in ("features", "labels", "paths"):
            np.testing.assert_array_equal(got["train"][name][()], expected["train"][name][()])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_torchrun_two_ranks_on_shards_and_parquet_equal_single_process(
    tmp_path, weights_file, kind
):
    """CPU fp32: two ranks, each given whole shards (row groups), merge to the file one
    process writes, bit for bit, failed rows included."""
    data = write_folder(tmp_path / "data", train_per_class=5, val_per_class=2)
    train, val = samples_of(data, "train"), samples_of(data, "val")
    train[3] = (train[3][0], train[3][1], b"not a jpeg")
    if kind == "shards":
        write_shards(train, str(tmp_path / "t-{:d}.tar"), per_shard=5)
        write_shards(val, str(tmp_path / "v-{:d}.tar"), per_shard=3)
        sources = [f"train={tmp_path}/t-{{0..2}}.tar", f"val={tmp_path}/v-*.tar"]
    else:
        write_parquet(train, tmp_path / "t.parquet", row_group=5)
        write_parquet(val, tmp_path / "v.parquet", row_group=3)
        sources = [f"train={tmp_path}/t.parquet", f"val={tmp_path}/v.parquet"]
    single = tmp_path / "single.h5"
    done = subprocess.run(
        [sys.executable, "-m", "extract", *cli_args(sources, single, weights_file)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "sharded.h5"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    process = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "extract", *cli_args(sources, out, weights_file)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "extracted 20 images, 1 failed" in process.stdout
    with h5py.File(out) as got, h5py.File(single) as expected:
        for split in ("train", "val"):
            for name in ("features", "labels", "paths", "failed"):
                np.testing.assert_array_equal(got[split][name][()], expected[split][name][()])
