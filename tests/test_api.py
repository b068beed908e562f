"""The Python API: the commands' work as functions, the cache as NumPy arrays, one error type."""

from __future__ import annotations

import dataclasses
import pydoc
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import extract
from conftest import REPO
from extract import __main__ as extract_cli
from extract.errors import UserError, run_cli
from extract.runner import Options
from head import train as head_train

QUIET = {"workers": 0, "batch_size": 8, "progress": False}


def command_error(main, argv: list[str], capsys) -> str:
    """The line a command prints for an expected problem, without its ``error: `` prefix."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, [str(arg) for arg in argv])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


def test_run_extracts_as_the_command_does_and_load_gives_the_stored_arrays(
    tiny_imagenet, tmp_path, weights_file, capfd
):
    out = tmp_path / "features.h5"
    summary = extract.run(
        str(tiny_imagenet),
        out,
        weights=weights_file,
        splits="train,val,test",
        flip=True,
        store_dtype="float32",
        **QUIET,
    )
    assert (summary.images, summary.failed) == (20, 0)
    assert capfd.readouterr() == ("", ""), "progress off: nothing printed"

    cache = extract.load(out)
    assert not cache.lazy and list(cache.splits) == ["train", "val", "test"]
    with h5py.File(out, "r") as file:  # h5py directly, not the project's reader
        assert cache.wnids == list(file["classes/wnids"].asstr()[()])
        assert cache.names == ["goldfish", "European fire salamander", "bullfrog"]
        assert cache.provenance["weights"] == str(weights_file)
        assert cache.provenance["weights_sha256"] == file.attrs["weights_sha256"]
        for name, split in cache.splits.items():
            assert isinstance(split.features, np.ndarray)
            assert split.features.dtype == np.float32 and split.features.shape == (
                len(split.paths),
                4096,
            )
            np.testing.assert_array_equal(split.features, file[name]["features"][()])
            np.testing.assert_array_equal(split.features_flip, file[name]["features_flip"][()])
            np.testing.assert_array_equal(split.labels, file[name]["labels"][()])
            assert split.paths == list(file[name]["paths"].asstr()[()])
            assert split.failed == []
    assert cache["test"].labels.tolist() == [-1, -1]
    assert cache["val"].labels.tolist() == [0, 0, 1, 1, 2, 2]

    with extract.load(out, lazy=True) as lazy:
        rows = lazy["train"].features
        assert isinstance(rows, h5py.Dataset) and rows.shape == (12, 4096)
        np.testing.assert_array_equal(rows[3:7], cache["train"].features[3:7])
    assert not rows.id.valid, "closed with the with block"


def test_run_takes_each_option_of_the_command_with_its_default(tmp_path):
    args = extract_cli.parse_args(["--data", "images", "--out", "features.h5"])
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(Options)
        if field.name not in ("data", "out")
    }
    assert extract_cli.options(args) == defaults
    with pytest.raises(TypeError, match="batchsize"):
        extract.run(tmp_path, tmp_path / "f.h5", batchsize=8)


def test_run_raises_the_error_the_command_prints(tiny_imagenet, tmp_path, capsys):
    cases = [
        (["--data", tmp_path / "missing", "--out", tmp_path / "f.h5"], {}),
        (["--data", tiny_imagenet, "--out", tmp_path / "f.h5", "--resume", "--overwrite"], {}),
        (["--data", tiny_imagenet, "--out", tmp_path / "f.h5", "--batch-size", "0"], {}),
    ]
    for argv, _ in cases:
        printed = command_error(extract_cli.main, argv, capsys)
        args = extract_cli.parse_args([str(arg) for arg in argv])
        with pytest.raises(UserError) as raised:
            extract.run(args.data, args.out, **extract_cli.options(args))
        assert str(raised.value) == printed


def test_load_refuses_incomplete_and_foreign_files_with_the_line_the_commands_print(
    features_file, tmp_path, capsys
):
    incomplete = tmp_path / "incomplete.h5"
    incomplete.write_bytes(features_file.read_bytes())
    with h5py.File(incomplete, "r+") as file:
        file.attrs["complete"] = False
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = np.zeros(3)
    for path, fragment in (
        (incomplete, "incomplete feature file"),
        (foreign, "not a feature file made by extract"),
        (tmp_path / "missing.h5", "feature file not found"),
    ):
        printed = command_error(
            head_train.main, ["--features", path, "--save", tmp_path / "model"], capsys
        )
        with pytest.raises(UserError) as raised:
            extract.load(path)
        assert str(raised.value) == printed and fragment in printed


def test_importing_the_packages_leaves_out_the_image_pipeline():
    code = "import sys, extract, head; print('torchvision' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr


def test_help_lists_the_api_first():
    text = pydoc.render_doc(extract, renderer=pydoc.plaintext)
    assert text.index("extract.run(data, out, **options)") < text.index("PACKAGE CONTENTS")
    assert extract.__all__ == ["run", "load", "UserError"]
    for function in (extract.run, extract.load):
        assert function.__doc__ and function.__annotations__


def test_user_error_is_one_type_importable_from_each_package(tmp_path):
    assert extract.UserError is UserError
    with pytest.raises(extract.UserError):
        extract.load(Path(tmp_path / "missing.h5"))
