"""live: the stitched model, the frame sources, and the command run headless on generated videos."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    WNIDS,
    extract_features,
    read_video,
    run_live,
    video_frames,
    write_lossless_video,
)
from extract import backbone, store
from extract.backbone import default_preprocess
from extract.errors import UserError
from extract.preprocess import normalize
from live import model, session
from live.__main__ import main
from live.sources import Frame, LiveCapture, open_source, read_ahead
from live.window import PAUSE, QUIT, SNAPSHOT, DisplayFailed, display_missing


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pure_red_bgr_frame_lands_in_the_red_channel():
    red = np.zeros((120, 160, 3), np.uint8)
    red[..., 2] = 255  # OpenCV's BGR order: red is the last channel
    pixels = model.frame_pixels(red, default_preprocess())
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    assert (pixels[0] == 255).all() and (pixels[1:] == 0).all()
    # the checkpoint's parameters, not ours
    other = dataclasses.replace(default_preprocess(), resize_size=160, crop_size=128)
    assert model.frame_pixels(red, other).shape == (3, 128, 128)


def test_stitched_model_gives_the_logits_of_fc7_then_head(model_dir, weights_file):
    classifier = model.from_checkpoint(model_dir, device="cpu")
    assert not classifier.network.training
    network = backbone.load_network("alexnet", str(weights_file))
    reference_fc7 = torch.nn.Sequential(
        network.features, network.avgpool, torch.nn.Flatten(1), network.classifier[:6]
    )
    head = torch.load(model_dir / "best.pt", weights_only=True)["state_dict"]
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = reference_fc7(images) @ head["weight"].T + head["bias"]
        actual = classifier.network(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert classifier.names == ["goldfish", "European fire salamander", "bullfrog"]


def test_weights_other_than_the_recorded_ones_are_refused(model_dir):
    with pytest.raises(UserError, match="sha256"):
        model.from_checkpoint(model_dir, weights="random", device="cpu")


def test_smoothing_is_an_exponential_moving_average_and_zero_is_off():
    first, second = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert np.array_equal(session.smoothed(first, second, 0.0), second)
    np.testing.assert_allclose(session.smoothed(first, second, 0.75), [0.75, 0.25])
    assert np.array_equal(session.smoothed(None, second, 0.75), second)


def test_smoothing_restarts_when_the_number_of_classes_changes():
    """A class taught or forgotten between two frames: the new frame's probabilities alone."""
    past, taught = np.array([0.5, 0.5]), np.array([0.2, 0.3, 0.5])
    assert np.array_equal(session.smoothed(past, taught, 0.75), taught)
    assert np.array_equal(session.smoothed(taught, past, 0.75), past)
    np.testing.assert_allclose(session.smoothed(taught, taught[::-1], 0.5), [0.35, 0.3, 0.35])


def test_log_record_holds_the_raw_top_k_and_the_top_1_of_the_average():
    """The JSONL line, field by field: top-k of this frame's probabilities (ties in class
    order), the top-1 of the moving average, the latency in ms to the microsecond."""
    classes = SimpleNamespace(wnids=["n1", "n2", "n3", "n4"], names=["a", "b", "c", "d"])
    probs = np.array([0.1, 0.6, 0.05, 0.25], np.float32)
    average = np.array([0.2, 0.1, 0.5, 0.2], np.float32)
    before = time.time()
    record = session.log_record(
        Frame(7, np.zeros((2, 2, 3), np.uint8), 0.0, "x/y.png"),
        12.34567,
        probs,
        average,
        classes,
        3,
    )
    assert before - 1e-6 <= record["time"] <= time.time() + 1e-6
    assert record == {
        "frame": 7,
        "time": record["time"],
        "latency_ms": 12.346,
        "topk": [
            {"index": 1, "wnid": "n2", "name": "b", "prob": 0.6},
            {"index": 3, "wnid": "n4", "name": "d", "prob": 0.25},
            {"index": 0, "wnid": "n1", "name": "a", "prob": 0.1},
        ],
        "smoothed_top1": {"index": 2, "wnid": "n3", "name": "c", "prob": 0.5},
        "path": "x/y.png",
    }
    frame = Frame(8, np.zeros((2, 2, 3), np.uint8), 0.0)
    assert "path" not in session.log_record(frame, 1.0, probs, average, classes, 1)
    assert session.top_indices(np.array([0.2, 0.4, 0.4, 0.0]), 3).tolist() == [1, 2, 0]
    tied = np.zeros(1000)  # ImageNet's 1000 classes, four of them tied
    tied[[900, 5, 700, 300]] = 0.25
    assert session.top_indices(tied, 5).tolist() == [5, 300, 700, 900, 0]


def test_video_file_gives_every_frame_in_order_and_loops(tmp_path):
    frames = video_frames(5)
    path = write_lossless_video(tmp_path / "clip.avi", frames)
    with open_source(str(path)) as source:
        read = list(source.frames())
    assert [f.index for f in read] == list(range(5))
    assert all(np.array_equal(f.bgr, g) for f, g in zip(read, frames))
    assert source.fps == 10.0 and not source.live
    with open_source(str(path), loop=True) as source:
        looped = [f for _, f in zip(range(12), source.frames())]
    assert [f.index for f in looped] == list(range(12))
    assert np.array_equal(looped[7].bgr, frames[2])


def test_image_folder_and_glob_give_files_in_sorted_order_as_bgr(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("b.png", (0, 255, 0)), ("a.png", (255, 0, 0)), ("c.txt", None)):
        if colour:
            Image.new("RGB", (32, 24), colour).save(folder / name)
        else:
            (folder / name).write_text("not an image")
    for spec in (str(folder), str(folder / "*.png")):
        with open_source(spec) as source:
            read = list(source.frames())
        assert [Path(f.path).name for f in read] == ["a.png", "b.png"]
        assert tuple(read[0].bgr[0, 0]) == (0, 0, 255)  # RGB red, stored BGR


@pytest.mark.parametrize(
    "spec, message",
    [
        ("9", "camera 9 cannot be opened"),
        ("missing.mp4", "no such file or folder"),
        ("garbage.avi", "cannot be read as a video"),
        ("empty", "no images in this folder"),
        ("empty/*.jpg", "no image files match"),
    ],
)
def test_sources_that_cannot_be_opened_raise_one_clear_error(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.avi").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(UserError, match=message):
        open_source(spec)


class FakeCamera:
    """A capture that delivers numbered frames every `interval` seconds, `count` of them."""

    def __init__(self, count: int | None, interval: float = 0.001):
        self.count, self.interval = count, interval
        self.delivered = 0
        self.releases = 0

    def read(self):
        if self.count is not None and self.delivered >= self.count:
            return False, None
        time.sleep(self.interval)
        self.delivered += 1
        return True, np.full((4, 4, 3), self.delivered - 1, np.uint8)

    def get(self, prop):
        return 30.0

    def release(self):
        self.releases += 1


def test_capture_thread_keeps_only_the_newest_frame_and_counts_the_dropped(tmp_path):
    camera = FakeCamera(count=60)
    with LiveCapture(0, "fake", open_capture=lambda target, description: camera) as source:
        seen = []
        for frame in source.frames():
            assert int(frame.bgr[0, 0, 0]) == frame.index
            seen.append(frame.index)
            time.sleep(0.005)  # a classifier slower than the camera
    assert seen == sorted(set(seen))  # in order, never the same frame twice
    assert seen[-1] == 59  # the last frame of an ending stream is still classified
    assert source.dropped == 60 - len(seen) > 0
    assert camera.releases == 1


def test_capture_is_released_when_the_loop_stops_early():
    camera = FakeCamera(count=None)
    with LiveCapture(0, "fake", open_capture=lambda target, description: camera) as source:
        for frame in source.frames():
            if frame.index >= 3:
                break
    assert camera.releases == 1
    assert not any(thread.name == "live-capture" for thread in threading.enumerate())


def test_read_ahead_is_in_order_at_most_one_frame_ahead_and_passes_errors_on():
    prepared = []

    def prepare(frame):
        if frame.index == 5:
            raise ValueError("frame 5 is broken")
        prepared.append(frame.index)
        return frame.index * 10

    frames = (Frame(i, np.zeros((2, 2, 3), np.uint8), time.perf_counter()) for i in range(8))
    taken = []
    with pytest.raises(ValueError, match="frame 5"):
        for frame, result in read_ahead(frames, prepare):
            assert result == frame.index * 10
            taken.append(frame.index)
            time.sleep(0.01)
            assert len(prepared) <= len(taken) + 1  # never more than the next frame
    assert taken == [0, 1, 2, 3, 4]
    assert not any(thread.name == "live-read-ahead" for thread in threading.enumerate())


# bf16 against fp32 on the CPU, class-mean head (conftest.class_mean_head): on a 2-core CPU the
# logits were at most 0.016 apart (0.6% of the largest logit) and the probabilities 0.0011.
BF16_LOGIT_RTOL = 0.02  # of the largest logit of the frame
BF16_PROBABILITY_ATOL = 0.005


def frame_logits(classifier: model.Classifier, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        images = normalize(pixels.unsqueeze(0), classifier.params, classifier.dtype)
        return classifier.network(images).float()[0].numpy()


def assert_close_to_fp32(logits, probs, expected_logits, expected_probs) -> None:
    scale = np.abs(expected_logits).max(axis=1, keepdims=True)
    assert (np.abs(logits - expected_logits) <= BF16_LOGIT_RTOL * scale).all()
    np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=BF16_PROBABILITY_ATOL)


def test_bf16_gives_probabilities_close_to_fp32(model_dir):
    """CPU, bf16 network against fp32, within what bf16's 8-bit mantissa allows; a model that
    always answers 1/3, or the probabilities of the neighbouring frame, are refused."""
    fp32 = model.from_checkpoint(model_dir, device="cpu")
    bf16 = model.from_checkpoint(model_dir, device="cpu", precision="bf16")
    assert next(bf16.network.parameters()).dtype == torch.bfloat16
    pixels = [model.frame_pixels(frame, fp32.params) for frame in video_frames(6)]
    expected_logits = np.stack([frame_logits(fp32, p) for p in pixels])
    expected = np.stack([fp32.probabilities(p) for p in pixels])
    logits = np.stack([frame_logits(bf16, p) for p in pixels])
    probs = np.stack([bf16.probabilities(p) for p in pixels])
    assert probs.dtype == np.float32
    assert expected.max(axis=1).min() > 0.8, "the test data must separate the classes"
    assert not np.array_equal(logits, expected_logits), "bf16 really ran"
    assert_close_to_fp32(logits, probs, expected_logits, expected)

    constant = (np.zeros_like(logits), np.full_like(probs, 1 / 3))
    neighbour = (np.roll(logits, 1, axis=0), np.roll(probs, 1, axis=0))
    for wrong_logits, wrong_probs in (constant, neighbour):
        with pytest.raises(AssertionError):
            assert_close_to_fp32(wrong_logits, wrong_probs, expected_logits, expected)


SMOOTH = 0.6
LOG_LABELS = [0, 0, 0, 1, 1, 1, 2, 2]  # runs of a class, so smoothing lags at each change


def exponential_moving_average(probs: np.ndarray, alpha: float) -> np.ndarray:
    """The smoothing live documents, written out independently of live.session."""
    average = np.empty_like(probs)
    average[0] = probs[0]
    for index in range(1, len(probs)):
        average[index] = alpha * average[index - 1] + (1 - alpha) * probs[index]
    return average


def assert_log_matches(log: list[dict], expected: np.ndarray, k: int) -> None:
    """Each line's top-k (order and probabilities) and smoothed top-1 against `expected`."""
    assert len(log) == len(expected)
    average = exponential_moving_average(expected, SMOOTH)
    for line, probs, smooth in zip(log, expected, average):
        indices = [entry["index"] for entry in line["topk"]]
        assert indices == list(np.argsort(-probs)[:k])
        np.testing.assert_allclose(
            [entry["prob"] for entry in line["topk"]], probs[indices], rtol=0, atol=1e-4
        )
        assert [entry["wnid"] for entry in line["topk"]] == [WNIDS[i] for i in indices]
        assert line["smoothed_top1"]["index"] == int(np.argmax(smooth))
        assert line["smoothed_top1"]["prob"] == pytest.approx(smooth.max(), abs=1e-4)


def test_live_log_matches_the_extract_path_frame_by_frame(tmp_path, model_dir, weights_file):
    """No train/serve skew: each video frame, classified by live, gets the top-k and the
    probabilities of the same frame saved as PNG, run through extract, and the head applied to
    its features; the smoothed top-1 is that of an exponential moving average of those. The
    same comparison refuses the BGR-swapped frames, the neighbouring frame, and frames resized
    to 224 instead of 256 then cropped."""
    frames = video_frames(8, labels=LOG_LABELS)
    video = write_lossless_video(tmp_path / "frames.avi", frames)
    log_path = tmp_path / "frames.jsonl"
    result = run_live(
        *("--model", str(model_dir), "--source", str(video), "--log", str(log_path)),
        *("--topk", "3", "--smooth", str(SMOOTH), "--device", "cpu"),
    )
    assert result.returncode == 0, result.stderr
    assert "running headless" in result.stderr
    assert result.stdout.startswith("8 frames, 0 dropped")

    reference = tmp_path / "reference"
    for folder, images in (("frames", frames), ("swapped", [f[..., ::-1] for f in frames])):
        (reference / "train" / folder).mkdir(parents=True)
        for index, image in enumerate(images):
            cv2.imwrite(str(reference / "train" / folder / f"{index:03d}.png"), image)
    features_path = extract_features(
        reference,
        tmp_path / "reference.h5",
        splits=["train"],
        weights=str(weights_file),
        store_dtype="float32",
    )
    with store.open_complete(features_path) as file:
        split = store.read_split(file, "train")
    assert split.paths[:8] == [f"train/frames/{index:03d}.png" for index in range(8)]
    head = torch.load(model_dir / "best.pt", weights_only=True)["state_dict"]
    logits = torch.from_numpy(split.features) @ head["weight"].T + head["bias"]
    expected, swapped = np.split(torch.softmax(logits, dim=1).numpy(), 2)

    log = read_log(log_path)
    assert [line["frame"] for line in log] == list(range(8))
    assert all(line["latency_ms"] > 0 and line["time"] > 0 for line in log)
    raw_top1 = [line["topk"][0]["index"] for line in log]
    smoothed_top1 = [line["smoothed_top1"]["index"] for line in log]
    assert len({tuple(e["index"] for e in line["topk"]) for line in log}) >= 3, "orders differ"
    assert raw_top1 != smoothed_top1, "smoothing changes some frame's top-1"
    assert_log_matches(log, expected, k=3)

    classifier = model.from_checkpoint(model_dir, device="cpu")
    resized_224 = dataclasses.replace(classifier.params, resize_size=224)
    wrong_resize = np.stack(
        [classifier.probabilities(model.frame_pixels(f, resized_224)) for f in frames]
    )
    for wrong in (swapped, np.roll(expected, 1, axis=0), wrong_resize):
        with pytest.raises(AssertionError):
            assert_log_matches(log, wrong, k=3)


@pytest.mark.parametrize("source", ["7", "garbage.avi", "empty", "missing"])
def test_sources_that_cannot_be_opened_exit_2_with_one_line(tmp_path, model_dir, source):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.avi").write_bytes(b"\x00not a video" * 100)
    spec = source if source.isdigit() else str(tmp_path / source)
    result = run_live("--model", str(model_dir), "--source", spec)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")


def test_stream_that_ends_gives_a_summary_and_exit_0(tmp_path, model_dir):
    video = write_lossless_video(tmp_path / "stream.avi", video_frames(6))
    result = run_live(
        "--model",
        str(model_dir),
        "--source",
        video.as_uri(),
        "--log",
        str(tmp_path / "stream.jsonl"),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    log = read_log(tmp_path / "stream.jsonl")
    assert len(log) >= 1, "at least the last frame of an ending stream is classified"
    frames = [line["frame"] for line in log]
    assert frames == sorted(set(frames)) and frames[-1] == 5
    assert result.stdout.startswith(f"{len(log)} frames, {6 - len(log)} dropped")
    assert "latency p50" in result.stdout and "p95" in result.stdout


def test_output_video_has_one_annotated_frame_per_classified_frame(tmp_path, model_dir, capsys):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(4))
    status = main(
        [
            "--model",
            str(model_dir),
            "--source",
            str(video),
            "--no-display",
            "--loop",
            "--max-frames",
            "10",
            "--output",
            str(tmp_path / "out.mp4"),
            "--smooth",
            "0.5",
            "--threshold",
            "0.9",
        ]
    )
    assert status == 0
    assert capsys.readouterr().out.startswith("10 frames, 0 dropped")
    written = read_video(tmp_path / "out.mp4")
    assert len(written) == 10
    assert written[0].shape[1] >= 480  # small frames are enlarged so the labels are readable
    capture = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    capture.release()


def test_imagenet_mode_predicts_the_1000_imagenet_classes(tmp_path, torch_home, capsys):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(2))
    status = main(
        [
            "--imagenet",
            "--source",
            str(video),
            "--no-display",
            "--log",
            str(tmp_path / "imagenet.jsonl"),
        ]
    )
    assert status == 0
    categories = backbone.categories("alexnet", "imagenet")
    log = read_log(tmp_path / "imagenet.jsonl")
    assert len(log) == 2 and len(log[0]["topk"]) == 5
    for entry in log[0]["topk"]:
        assert entry["name"] == categories[entry["index"]]


def test_display_that_is_unset_or_unreachable_means_headless(monkeypatch):
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    assert "unset" in display_missing()
    monkeypatch.setenv("DISPLAY", "localhost:97")  # nothing listens on TCP 6097
    assert "does not answer" in display_missing()


class ScriptedWindow:
    """A window whose user presses the given keys, one per shown frame."""

    def __init__(self, actions: list[str | None]):
        self.actions = list(actions)
        self.shown = 0
        self.closed = False

    def show(self, bgr, wait_ms: int = 1):
        self.shown += 1
        if self.actions == ["fail"]:
            raise DisplayFailed("cannot show")
        return self.actions.pop(0) if self.actions else None

    def close(self):
        self.closed = True


def test_keys_pause_snapshot_and_quit_and_a_failing_display_goes_headless(
    tmp_path, model_dir, capsys
):
    classifier = model.from_checkpoint(model_dir, device="cpu")
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(6))
    window = ScriptedWindow([None, PAUSE, SNAPSHOT, PAUSE, QUIT])
    with open_source(str(video)) as source:
        summary = session.run(
            classifier, source, session.Settings(window=window, snapshot_dir=tmp_path)
        )
    assert summary.frames == 3  # quit while showing the third frame; pause held the second
    assert window.shown == 5 and window.closed
    assert (tmp_path / "snapshot_000001.png").is_file()

    window = ScriptedWindow(["fail"])
    with open_source(str(video)) as source:
        summary = session.run(classifier, source, session.Settings(window=window))
    assert summary.frames == 6 and window.shown == 1 and window.closed
    assert "continuing headless" in capsys.readouterr().err
