"""The video is encoded off the frame loop: every frame, in order, and errors still one line."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from conftest import read_video, video_frames, write_lossless_video
from extract.errors import UserError, run_cli
from live import output
from live.__main__ import default_threads, main
from live.model import default_threads as cpu_threads


def test_frames_are_written_in_order_by_the_encoder_thread(tmp_path):
    levels = list(range(0, 240, 16))  # one grey level per frame, rising
    video = output.VideoOutput(tmp_path / "grey.mp4", fps=10.0, queued=2)
    for level in levels:
        video.write(np.full((96, 128, 3), level, np.uint8))
    assert any(thread.name == "live-video-writer" for thread in threading.enumerate())
    video.close()
    assert not any(thread.name == "live-video-writer" for thread in threading.enumerate())
    written = read_video(tmp_path / "grey.mp4")
    assert len(written) == len(levels)
    means = [frame.mean() for frame in written]
    assert means == sorted(means)
    np.testing.assert_allclose(means, levels, atol=6)  # mp4v is lossy


def test_frames_of_another_size_are_resized_to_the_first(tmp_path):
    video = output.VideoOutput(tmp_path / "mixed.mp4", fps=5.0)
    video.write(np.zeros((96, 128, 3), np.uint8))
    video.write(np.full((50, 70, 3), 200, np.uint8))
    video.close()
    written = read_video(tmp_path / "mixed.mp4")
    assert [frame.shape for frame in written] == [(96, 128, 3)] * 2
    assert written[1].mean() == pytest.approx(200, abs=3)


class FailingWriter:
    """A cv2.VideoWriter whose encoder fails on the third frame."""

    def __init__(self, *args):
        self.count = 0

    def isOpened(self) -> bool:
        return True

    def write(self, frame) -> None:
        self.count += 1
        if self.count == 3:
            raise cv2.error("encoder ran out of buffers\nsecond line of detail")

    def release(self) -> None:
        pass


def test_an_encoder_error_is_raised_in_the_loop_as_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(output.cv2, "VideoWriter", FailingWriter)
    video = output.VideoOutput(tmp_path / "x.mp4", fps=10.0, queued=1)
    with pytest.raises(UserError, match="writing the video failed") as raised:
        for _ in range(50):
            video.write(np.zeros((8, 8, 3), np.uint8))
        video.close()
    assert "\n" not in str(raised.value) and "ran out of buffers" in str(raised.value)
    video.close()  # reported once; closing again is quiet


def test_an_encoder_error_ends_the_command_with_one_line(tmp_path, model_dir, monkeypatch, capsys):
    video = write_lossless_video(tmp_path / "clip.avi", video_frames(6))
    monkeypatch.setattr(output.cv2, "VideoWriter", FailingWriter)  # cv2's own: after writing
    argv = ["--model", str(model_dir), "--source", str(video), "--no-display", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*argv, "--output", str(tmp_path / "out.mp4")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and "writing the video failed" in lines[0], lines


def test_thread_default_is_every_core_on_the_cpu_and_one_on_cuda():
    assert default_threads("cpu") == cpu_threads()
    if torch.cuda.is_available():
        assert default_threads("cuda") == default_threads("auto") == 1


def test_the_first_frame_shows_its_rates_as_unknown_not_as_zero():
    from live.overlay import status_line
    from live.timing import RateMeter

    meter = RateMeter()
    meter.tick(1.0)  # one frame: no interval to measure a rate from yet
    first = status_line(meter.rate, meter.rate, 12.0)
    assert first == "camera -- fps  inference -- fps  12 ms" and "0.0 fps" not in first
    meter.tick(1.04)
    # Negative control: once measured, the rate is shown.
    assert status_line(meter.rate, meter.rate, 12.0) == "camera 25.0 fps  inference 25.0 fps  12 ms"
