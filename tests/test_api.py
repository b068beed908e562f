"""The Python API: the commands' work as functions, the cache as NumPy arrays, one error type."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import extract
import head
import live
from conftest import REPO, pattern_image
from extract import __main__ as extract_cli
from extract import api as extract_api
from extract import demo
from extract.device import DEFAULT_DEVICE
from extract.errors import UserError, run_cli
from extract.options import Options
from head import evaluate as head_evaluate
from head import train as head_train
from head.settings import Settings
from live import __main__ as live_cli
from live import session as live_session
from live.model import from_checkpoint

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
    tiny_imagenet, tmp_path, weights_file, capfd, monkeypatch
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
    monkeypatch.setattr(extract_api, "available_memory", lambda: 100_000)  # < 20 x 4096 x 4
    with extract.load(out) as larger_than_memory:
        assert larger_than_memory.lazy
        assert isinstance(larger_than_memory["val"].features, h5py.Dataset)


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


def keyword_defaults(function) -> dict:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def test_each_api_keyword_shows_the_default_of_the_options_dataclass_and_of_the_command():
    """extract.run and Options and python -m extract; head.fit and Settings and head.train;
    live.load and live.model and python -m live: one default each, visible in help()."""
    options = {f.name: f.default for f in dataclasses.fields(Options)}
    run_defaults = keyword_defaults(extract.run)
    assert run_defaults == {k: v for k, v in options.items() if k not in ("data", "out")}
    command = extract_cli.options(extract_cli.parse_args(["--data", "d", "--out", "o"]))
    assert command == run_defaults
    assert "batch_size: 'int' = 128" in pydoc.render_doc(extract.run, renderer=pydoc.plaintext)

    settings = {f.name: f.default for f in dataclasses.fields(Settings)}
    fit_defaults = keyword_defaults(head.fit)
    assert {k: fit_defaults[k] for k in settings} == settings
    parsed = vars(head_train.parse_args(["--features", "f", "--save", "s"]))
    assert {k: parsed[k] for k in settings if k in parsed} == {
        k: settings[k] for k in settings if k in parsed
    }
    assert len([k for k in settings if k in parsed]) == 11  # all but cuda_graphs and progress
    assert parsed["device"] == fit_defaults["device"] == DEFAULT_DEVICE == options["device"]

    live_args = live_cli.parse_args(["--model", "m"])
    for function in (live.load, from_checkpoint):
        parameters = inspect.signature(function).parameters
        assert parameters["device"].default == live_args.device == DEFAULT_DEVICE
        assert parameters["precision"].default == live_args.precision
    for key in ("topk", "smooth", "threshold"):
        assert getattr(live_args, key) == getattr(live_session.Settings, key)
    assert live_args.backbone == options["backbone"]
    # Negative control: a flag given on the command line is seen as differing from the default.
    changed = extract_cli.parse_args(["--data", "d", "--out", "o", "--batch-size", "7"])
    assert extract_cli.options(changed) != run_defaults


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
        assert raised.value.for_command() == printed


def test_an_error_names_the_flag_from_a_command_and_the_keyword_from_python(
    tiny_imagenet, tmp_path, capsys
):
    """Each problem twice: the command's line names the flag, the API's message the keyword,
    and otherwise they are the same words."""
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"")
    saved = tmp_path / "model"
    saved.mkdir()
    (saved / "last.pt").write_bytes(b"")
    data = ["--data", tiny_imagenet]
    heads = ["--features", tmp_path / "f.h5", "--save", saved]
    cases = [
        (
            extract_cli.main,
            [*data, "--out", taken, "--no-progress"],
            lambda: extract.run(tiny_imagenet, taken, progress=False),
            ("--overwrite", "overwrite=True"),
        ),
        (
            extract_cli.main,
            [*data, "--out", taken, "--resume", "--overwrite"],
            lambda: extract.run(tiny_imagenet, taken, resume=True, overwrite=True),
            ("--resume and --overwrite", "resume=True and overwrite=True"),
        ),
        (
            extract_cli.main,
            [*data, "--out", taken, "--batch-size", "0"],
            lambda: extract.run(tiny_imagenet, taken, batch_size=0),
            ("--batch-size must be >= 1 and --workers", "batch_size must be >= 1 and workers"),
        ),
        (
            extract_cli.main,
            [*data, "--out", taken, "--device", "tpu"],
            lambda: extract.run(tiny_imagenet, taken, device="tpu"),
            ("--device tpu: choose", "device='tpu': choose"),
        ),
        (
            head_train.main,
            heads,
            lambda: head.fit(tmp_path / "f.h5", saved),
            (
                "(use --resume to continue it, or --overwrite",
                "(use resume=True to continue it, or overwrite=True",
            ),
        ),
        (
            head_train.main,
            [*heads, "--epochs", "0", "--overwrite"],
            lambda: head.fit(tmp_path / "f.h5", saved, epochs=0, overwrite=True),
            (
                "--epochs must be >= 1 (0 is allowed with --init classifier",
                "epochs must be >= 1 (0 is allowed with init='classifier'",
            ),
        ),
    ]
    for main, argv, call, (flag, keyword) in cases:
        printed = command_error(main, argv, capsys)
        with pytest.raises(UserError) as raised:
            call()
        assert flag in printed and keyword in str(raised.value), printed
        assert raised.value.for_command() == printed
        # Negative control: the API's message is not the command's line, nor does it name the flag.
        assert flag not in str(raised.value) and str(raised.value) != printed


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
    code = (
        "import sys, extract, head; "
        "print([m for m in ('torchvision', 'sklearn', 'matplotlib') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize(
    "package, first",
    [
        (extract, "extract.run(data, out, *, backbone="),
        (head, "head.fit(features, save, *, epochs="),
        (live, "live.load(model, device="),
    ],
)
def test_help_lists_the_api_first_and_each_public_function_is_typed_and_documented(package, first):
    text = pydoc.render_doc(package, renderer=pydoc.plaintext)
    assert text.index(first) < text.index("PACKAGE CONTENTS")
    for name in package.__all__:
        public = getattr(package, name)
        assert public.__doc__
        if callable(public) and not isinstance(public, type):
            assert "return" in public.__annotations__


def test_user_error_is_one_type_importable_from_each_package(tmp_path):
    assert extract.UserError is UserError and head.UserError is UserError
    assert live.UserError is UserError
    with pytest.raises(extract.UserError):
        extract.load(Path(tmp_path / "missing.h5"))


def test_fit_trains_what_the_command_trains_and_returns_the_last_checkpoint(
    features_file, tmp_path, capfd
):
    argv = ["--features", features_file, "--save", tmp_path / "command", "--epochs", "3"]
    with pytest.raises(SystemExit):
        run_cli(head_train.main, [*map(str, argv), "--batch-size", "5", "--no-progress"])
    capfd.readouterr()
    with pytest.warns(UserWarning, match="no flipped features"):
        result = head.fit(
            str(features_file), tmp_path / "api", epochs=3, batch_size=5, flip=True, progress=False
        )
    assert capfd.readouterr() == ("", ""), "progress off: nothing printed"
    command = torch.load(tmp_path / "command" / "last.pt", weights_only=True)
    saved = torch.load(tmp_path / "api" / "last.pt", weights_only=True)
    state = result.checkpoint.to_dict()
    torch.testing.assert_close(state["state_dict"], saved["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(state["state_dict"], command["state_dict"], rtol=0, atol=0)
    assert state["epoch"] == 3 and state["train_loss"] == command["train_loss"]
    assert result.best_top1 == state["best_accuracy"] == command["best_accuracy"]
    assert result.best_epoch == command["best_epoch"] and result.epochs == 3
    assert result.history["train_loss"] == command["train_loss"]
    assert result.best == tmp_path / "api" / "best.pt" and result.last.is_file()
    # A short repr: one line, no tensors, the optimizer state left out (negative control: the
    # checkpoint's own repr runs to thousands of characters).
    shown = repr(result)
    assert shown.startswith(f"FitResult(best_epoch={result.best_epoch}, best_top1=")
    assert "\n" not in shown and len(shown) < 300 and "tensor" not in shown
    assert len(repr(result.checkpoint)) > 10 * len(shown)
    with pytest.raises(UserError, match="resume=True and overwrite=True"):
        head.fit(features_file, tmp_path / "api", resume=True, overwrite=True)
    with pytest.raises(TypeError, match="epoch"):
        head.fit(features_file, tmp_path / "api", epoch=3)


def test_report_is_what_the_command_writes_to_report_json(features_file, tmp_path, capsys):
    head.fit(features_file, tmp_path / "model", epochs=2, batch_size=5, progress=False)
    with pytest.raises(SystemExit):
        run_cli(
            head_evaluate.main,
            ["--model", str(tmp_path / "model"), "--features", str(features_file)],
        )
    written = json.loads((tmp_path / "model" / "report.json").read_text())
    assert head.report(tmp_path / "model", features_file) == written
    assert written["split"] == "val" and written["images"] == 6
    printed = command_error(
        head_evaluate.main,
        ["--model", tmp_path / "model", "--features", features_file, "--split", "test"],
        capsys,
    )
    with pytest.raises(UserError) as raised:
        head.report(tmp_path / "model", features_file, split="test")
    assert str(raised.value) == printed and "no labels" in printed


def test_predict_on_image_files_gives_what_extract_and_the_head_give(
    tiny_imagenet, tmp_path, weights_file, model_dir
):
    """Independent of live's code path: the stored fc7 rows times the checkpoint's layer."""
    out = extract.run(
        tiny_imagenet,
        tmp_path / "f.h5",
        weights=weights_file,
        splits="test,val",
        store_dtype="float32",
        **QUIET,
    )
    assert out.images == 8
    cache = extract.load(tmp_path / "f.h5")
    layer = torch.load(model_dir / "best.pt", weights_only=True)["state_dict"]
    model = live.load(model_dir, device="cpu")
    for split in ("test", "val"):
        features = torch.from_numpy(cache[split].features).double()
        logits = features @ layer["weight"].double().T + layer["bias"].double()
        expected = torch.softmax(logits, dim=1).numpy()
        paths = [tiny_imagenet / path for path in cache[split].paths]
        predicted = model.predict(paths, topk=3)
        assert len(predicted) == len(paths)
        for row, top in zip(expected, predicted):
            assert [entry["index"] for entry in top] == np.argsort(-row).tolist()
            # fp32 on the CPU: extraction and live batch the same images differently.
            np.testing.assert_allclose([e["prob"] for e in top], np.sort(row)[::-1], atol=1e-5)
            assert top[0]["name"] == cache.names[top[0]["index"]]
            assert top[0]["wnid"] == cache.wnids[top[0]["index"]]


def test_predict_takes_paths_pil_images_rgb_arrays_and_bgr_frames_alike(tmp_path, model_dir):
    path = tmp_path / "image.png"
    pattern_image(1, 7, size=80).save(path)
    image = Image.open(path)
    rgb = np.asarray(image.convert("RGB"))
    model = live.load(model_dir, device="cpu")
    by_path = model.predict(path)
    assert len(by_path) == 3 and [e["prob"] for e in by_path] == sorted(
        (e["prob"] for e in by_path), reverse=True
    )
    assert model.predict(str(path)) == by_path
    assert model.predict(image) == by_path
    assert model.predict(rgb) == by_path
    assert model.predict_bgr(np.ascontiguousarray(rgb[..., ::-1])) == by_path
    # Batched, the CPU kernels may sum in another order: the same classes, probabilities
    # within fp32 rounding.
    for batch in (
        model.predict([path, image], topk=2),
        model.predict_bgr(np.stack([rgb[..., ::-1]] * 2), topk=2),
    ):
        assert len(batch) == 2
        for top in batch:
            assert [e["index"] for e in top] == [e["index"] for e in by_path[:2]]
            np.testing.assert_allclose(
                [e["prob"] for e in top], [e["prob"] for e in by_path[:2]], rtol=1e-5
            )
    with pytest.raises(UserError, match="H x W x 3 uint8"):
        model.predict(rgb.astype(np.float32))
    # A gray (H, W) array is what the same gray PIL image gives (CPU fp32, exact).
    gray = np.asarray(image.convert("L"))
    assert model.predict(gray) == model.predict(Image.fromarray(gray, "L"))
    assert model.predict(gray) != by_path  # negative control: gray is not the colour image
    with pytest.raises(UserError, match="H x W uint8 gray"):
        model.predict(gray.astype(np.int32))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg: unreadable image"):
        model.predict(tmp_path / "broken.jpg")


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    """The first python block under "## From Python", in a fresh process in an empty folder:
    the digits demo data, random backbone weights."""
    section = (REPO / "README.md").read_text().split("\n## From Python\n", 1)[1].split("\n## ")[0]
    block = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "train features: (300, 4096) float16"
    assert lines[1].startswith("scikit-learn: val accuracy ")
    assert lines[2].startswith("head.fit: val top-1 ")
    assert len(lines) == 6
    for line in lines[3:]:
        name, predictions = line.split(" ", 1)
        assert name.startswith("test_") and predictions.count("(") == 2
        assert all(digit in demo.NAMES for digit in re.findall(r"\('(\w+)'", predictions))
    assert (tmp_path / "digits-model" / "best.pt").is_file()


def test_load_takes_backbone_weights_kept_elsewhere_when_their_digest_is_the_recorded_one(
    tmp_path, model_dir, weights_file
):
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(weights_file.read_bytes())
    image = pattern_image(2, 5)
    recorded = live.load(model_dir, device="cpu").predict(image)
    assert live.load(model_dir, device="cpu", weights=moved).predict(image) == recorded
    with pytest.raises(UserError, match="--weights random: sha256 .* differs"):
        live.load(model_dir, device="cpu", weights="random")


def test_a_run_removes_its_lock_and_a_file_in_progress_is_named_with_its_writers_pid(
    tiny_imagenet, features_file, tmp_path, capsys
):
    from extract import lock

    assert not lock.lock_path(features_file).exists(), "the finished run removed its lock"
    out = tmp_path / "busy.h5"
    part = tmp_path / "busy.h5.part"
    part.write_bytes(features_file.read_bytes())
    code = (
        "import sys, time; from pathlib import Path; from extract import lock; "
        f"held = lock.acquire(Path({str(out)!r})); print('ready', flush=True); time.sleep(60)"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        printed = command_error(
            head_train.main, ["--features", out, "--save", tmp_path / "m"], capsys
        )
        assert printed == (
            f"{out}: still being written by extract (pid {writer.pid}); it appears under this "
            f"name when complete"
        )
        with pytest.raises(UserError, match=f"extract \\(pid {writer.pid}\\) is still writing"):
            extract.load(part)
        with pytest.raises(UserError, match=f"another extract run \\(pid {writer.pid}\\)"):
            extract.run(tiny_imagenet, out, progress=False, workers=0)
    finally:
        writer.kill()
        writer.wait()
    # Negative control: with the writer gone, the same .part is an interrupted run.
    with pytest.raises(UserError, match="interrupted extract run left busy.h5.part"):
        extract.load(out)


def test_a_truncated_feature_file_says_so_and_how_to_extract_it_again(features_file, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(features_file.read_bytes()[: features_file.stat().st_size // 2])
    with pytest.raises(UserError) as raised:
        extract.load(truncated)
    message = str(raised.value)
    assert message.startswith(f"{truncated}: damaged or truncated HDF5 file (")
    assert message.endswith("extract the features again (python -m extract ... --overwrite)")
    assert "\n" not in message
    # Negative control: a file that never was HDF5 is not called damaged.
    text = tmp_path / "notes.h5"
    text.write_text("not features\n")
    with pytest.raises(UserError, match="not a readable HDF5 file") as raised:
        extract.load(text)
    assert "damaged" not in str(raised.value)
