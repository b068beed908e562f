"""live: what it refuses to load (pickled code, another backbone, metadata that is not data) and
that the capture is released however a run ends."""

from __future__ import annotations

import ast
import pickle
import threading
from pathlib import Path

import pytest
import torch

from conftest import run_live, video_frames, write_lossless_video
from extract.errors import UserError
from live import export, model, session
from live.__main__ import classify, parse_args
from live.sources import VideoFile, open_source

LIVE = Path(__file__).resolve().parents[1] / "live"


class Payload:
    """Unpickling this creates `marker`: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def altered_checkpoint(model_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the test checkpoint with some entries replaced (`features` merged)."""
    state = torch.load(model_dir / "best.pt", weights_only=True)
    features = changes.pop("features", {})
    state["features"] = (
        {**state["features"], **features} if isinstance(features, dict) else features
    )
    state.update(changes)
    folder.mkdir()
    torch.save(state, folder / "best.pt")
    return folder


def test_checkpoint_with_pickled_code_is_refused_by_live_and_export_and_runs_nothing(
    tmp_path, model_dir
):
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: unpickling runs it
    assert marker.exists()
    marker.unlink()
    evil = altered_checkpoint(model_dir, tmp_path / "evil", optimizer=Payload(marker))
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(2))
    for module, *args in (
        ["live", "--model", str(evil), "--source", str(video)],
        ["live.export", "--model", str(evil), "--out", str(tmp_path / "e.pt")],
    ):
        result = run_live(*args, module=module)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {evil / 'best.pt'}: refused, it holds pickled Python objects, not only "
            f"tensors and plain data (loading them could run code)"
        ]
        assert not marker.exists()
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize(
    "backbone, node, message",
    [
        ("resnet_unknown", "flatten", "resnet_unknown, which is not a torchvision network"),
        ("resnet18", "flatten", "not a torchvision resnet18 state_dict"),
        ("alexnet", "classifier.7", "not a node of alexnet"),
        ("alexnet", "features.12", "the head takes 4096 features, the backbone gives 256"),
    ],
)
def test_checkpoint_of_another_backbone_or_layer_is_refused(
    tmp_path, model_dir, backbone, node, message
):
    other = altered_checkpoint(
        model_dir, tmp_path / "other", features={"backbone": backbone, "node": node}
    )
    with pytest.raises(UserError, match=message):
        model.from_checkpoint(other, device="cpu")
    with pytest.raises(UserError, match=message):
        export.main(["--model", str(other), "--out", str(tmp_path / "other.pt")])


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"features": {"preprocess": "__import__('pathlib').Path('{marker}').touch()"}},
            "not JSON",
        ),
        ({"features": {"preprocess": '{"resize_size": 256, "evil": 1}'}}, "not the parameters"),
        (
            {
                "features": {
                    "preprocess": '{"resize_size": "256", "crop_size": 224, "mean": [0, 0, 0], '
                    '"std": [1, 1, 1], "interpolation": "bilinear", '
                    '"antialias": true}'
                }
            },
            "not the parameters",
        ),
        ({"features": ["alexnet", "classifier.5"]}, "'features' must record"),
        ({"tiny_class": "{'n01443537': 'goldfish'}"}, "class names must be"),
        ({"numeric_class_names": "n01443537 n01629819 n01641577"}, "class names must be"),
    ],
)
def test_metadata_is_parsed_as_data_and_anything_else_is_refused(
    tmp_path, model_dir, changes, message
):
    marker = tmp_path / "code-ran"
    if "features" in changes and isinstance(changes["features"], dict):
        changes["features"] = {
            key: value.replace("{marker}", str(marker))
            for key, value in changes["features"].items()
        }
    bad = altered_checkpoint(model_dir, tmp_path / "bad", **changes)
    with pytest.raises(UserError, match=message):
        model.from_checkpoint(bad, device="cpu")
    assert not marker.exists()


def test_nothing_in_live_is_evaluated_or_unpickled():
    """A static check of the package: no eval, exec or pickle (checkpoints are read through
    head.checkpoint.load; test_extract_faults checks every torch.load for weights_only)."""
    for path in LIVE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                assert ast.unparse(node.func) not in ("eval", "exec"), (path, node.lineno)
            if isinstance(node, ast.Import | ast.ImportFrom):
                assert "pickle" not in ast.unparse(node), (path, node.lineno)


class Recorder:
    """Wraps `open_source` to keep the sources a run opened."""

    def __init__(self):
        self.sources = []

    def __call__(self, spec, loop=False):
        source = open_source(spec, loop=loop)
        self.sources.append(source)
        return source


def capture_released(source: VideoFile) -> bool:
    return not source.capture.isOpened()


def no_reader_thread_left() -> bool:
    return not any(t.name == "live-read-ahead" for t in threading.enumerate())


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr("live.__main__.open_source", recorder)
    return recorder


def test_capture_is_released_when_the_model_cannot_be_loaded(tmp_path, model_dir, recorded):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(3))
    other = altered_checkpoint(model_dir, tmp_path / "other", features={"node": "x"})
    with pytest.raises(UserError):
        classify(parse_args(["--model", str(other), "--source", str(video), "--no-display"]))
    assert capture_released(recorded.sources[0])


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError, None])
def test_capture_is_released_when_the_loop_ends_fails_or_is_interrupted(
    tmp_path, model_dir, recorded, monkeypatch, failure
):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(6))
    probabilities = model.Classifier.probabilities
    calls = []

    def failing_on_the_third(self, pixels):
        calls.append(1)
        if failure is not None and len(calls) == model.WARM_UP_RUNS + 3:
            raise failure("stop")
        return probabilities(self, pixels)

    monkeypatch.setattr(model.Classifier, "probabilities", failing_on_the_third)
    args = parse_args(["--model", str(model_dir), "--source", str(video), "--no-display"])
    if failure is RuntimeError:
        with pytest.raises(RuntimeError):
            classify(args)
    else:
        summary = classify(args)
        assert summary.frames == (2 if failure else 6)
        assert summary.interrupted == (failure is KeyboardInterrupt)
    assert capture_released(recorded.sources[0])
    assert no_reader_thread_left()


def test_read_ahead_stops_its_thread_before_the_source_is_released(tmp_path, model_dir):
    classifier = model.from_checkpoint(model_dir, device="cpu")
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(8))
    with open_source(str(video), loop=True) as source:
        summary = session.run(classifier, source, session.Settings(max_frames=5))
        assert no_reader_thread_left()  # stopped before the source's release below
    assert summary.frames == 5 and capture_released(source)
