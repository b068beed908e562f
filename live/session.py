"""The frame loop: read, preprocess, classify, smooth, log, draw, write, show, react to keys.

Per frame, the stages are timed separately so the summary shows where the time goes: `wait` (for
the next frame: the camera, or the read-ahead thread of a file), `preprocess` (BGR -> RGB, resize,
crop; in the read-ahead thread for files and folders, so it overlaps the network), `network`,
`log`, `overlay`, `video` and `display`; a stage that did not run is not shown. Headless without
`--output` nothing is drawn. `video` is the time to hand a frame to the encoder's thread
(`live.output.VideoOutput`), which is near zero unless the encoder falls behind; the run's time
includes writing the last queued frames. `latency_ms` is from the moment the frame was read to
the moment its probabilities were known: for a camera that includes the wait for the loop, for a
file the wait while the frame before it was classified.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from live import overlay
from live.model import Classifier, frame_pixels
from live.output import FrameLog, VideoOutput
from live.sources import Frame, Source, read_ahead
from live.timing import RateMeter, StageTimes, percentiles
from live.window import PAUSE, QUIT, SNAPSHOT, DisplayFailed, Window

PAUSED_POLL_MS = 30
STAGES = ("wait", "preprocess", "network", "log", "overlay", "video", "display")


@dataclasses.dataclass
class Settings:
    topk: int = 5
    smooth: float = 0.0  # weight of the past in the moving average; 0 = off
    threshold: float = 0.0  # below this smoothed top-1 probability the overlay says "uncertain"
    window: Window | None = None  # None: headless
    output: Path | None = None
    log: Path | None = None
    max_frames: int | None = None
    snapshot_dir: Path = Path(".")


@dataclasses.dataclass
class Summary:
    frames: int
    dropped: int
    seconds: float
    latencies_ms: list[float]
    stage_ms: dict[str, float]  # mean milliseconds per frame of each stage
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        p50, p95 = percentiles(self.latencies_ms)
        stages = ", ".join(f"{name} {ms:.1f}" for name, ms in self.stage_ms.items())
        return (
            f"{self.frames} frames, {self.dropped} dropped, {self.fps:.1f} fps, "
            f"latency p50 {p50:.1f} ms, p95 {p95:.1f} ms (per frame ms: {stages})"
        )


def smoothed(previous: np.ndarray | None, probs: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average of the probabilities; alpha is the weight of the past. It
    restarts at `probs` when there is no past, or when the classes changed (teaching adds or
    removes one) and the past no longer lines up with them."""
    if previous is None or previous.shape != probs.shape or alpha == 0.0:
        return probs
    return alpha * previous + (1.0 - alpha) * probs


def top_indices(probs: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-probs, kind="stable")[:k]


def class_entry(classifier: Classifier, index: int, prob: float) -> dict:
    return {
        "index": int(index),
        "wnid": classifier.wnids[index],
        "name": classifier.names[index],
        "prob": round(float(prob), 7),
    }


def log_record(
    frame: Frame,
    latency_ms: float,
    probs: np.ndarray,
    average: np.ndarray,
    classifier: Classifier,
    k: int,
) -> dict:
    """The JSONL line: top-k of the raw probabilities, and the top-1 of the smoothed ones."""
    best = int(np.argmax(average))
    record = {
        "frame": frame.index,
        "time": round(time.time(), 6),
        "latency_ms": round(latency_ms, 3),
        "topk": [class_entry(classifier, i, probs[i]) for i in top_indices(probs, k)],
        "smoothed_top1": class_entry(classifier, best, average[best]),
    }
    if frame.path is not None:
        record["path"] = frame.path
    return record


def run(classifier: Classifier, source: Source, settings: Settings) -> Summary:
    """Classify frames until the source ends, `max_frames` are done, q/Esc, or Ctrl-C."""
    k = min(settings.topk, classifier.num_classes)
    window = settings.window
    video = VideoOutput(settings.output, source.fps) if settings.output else None
    log = FrameLog(settings.log) if settings.log else None
    inference_rate = RateMeter()
    latencies: list[float] = []
    stages = StageTimes()
    average = None
    frames = 0
    interrupted = False

    def prepare(frame: Frame) -> torch.Tensor:
        with stages.timing("preprocess"):
            return frame_pixels(frame.bgr, classifier.params)

    # A recorded source is read and preprocessed one frame ahead, overlapping the network; a
    # live one is not: its capture thread already reads ahead, and the freshest frame is wanted.
    prepared = (
        ((frame, None) for frame in source.frames())
        if source.live
        else read_ahead(source.frames(), prepare)
    )
    started = time.perf_counter()
    try:
        while True:
            with stages.timing("wait"):
                item = next(prepared, None)
            if item is None:
                break
            frame, pixels = item
            if pixels is None:
                pixels = prepare(frame)
            with stages.timing("network"):
                probs = classifier.probabilities(pixels)
            done = time.perf_counter()
            latency_ms = (done - frame.captured) * 1000.0
            latencies.append(latency_ms)
            inference_rate.tick(done)
            average = smoothed(average, probs, settings.smooth)
            frames += 1

            if log:
                with stages.timing("log"):
                    log.write(log_record(frame, latency_ms, probs, average, classifier, k))
            if video or window:
                with stages.timing("overlay"):
                    shown = top_indices(average, k)
                    annotated = overlay.annotate(
                        frame.bgr,
                        [(classifier.names[i], float(average[i])) for i in shown],
                        overlay.status_line(source.rate.rate, inference_rate.rate, latency_ms),
                        uncertain=float(average[shown[0]]) < settings.threshold,
                    )
                if video:
                    with stages.timing("video"):
                        video.write(annotated)
                if window:
                    try:
                        with stages.timing("display"):
                            action = react(window, annotated, frame, settings.snapshot_dir)
                    except DisplayFailed as error:
                        print(f"display failed ({error}): continuing headless", file=sys.stderr)
                        window.close()
                        window = None
                        action = None
                    if action == QUIT:
                        break
            if settings.max_frames and frames >= settings.max_frames:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        prepared.close()  # stops the read-ahead thread before the source is released
        if log:
            log.close()
        if window:
            window.close()
        if video:
            video.close()  # last: it waits for the queued frames, and may raise their error
    return Summary(
        frames=frames,
        dropped=source.dropped,
        seconds=time.perf_counter() - started,
        latencies_ms=latencies,
        stage_ms=stages.per_frame_ms(frames, STAGES),
        interrupted=interrupted,
    )


def react(window: Window, annotated: np.ndarray, frame: Frame, snapshot_dir: Path) -> str | None:
    """Show the frame and handle keys; while paused, keep polling here. Returns QUIT or None."""
    action = window.show(annotated)
    paused = False
    while True:
        if action == QUIT:
            return QUIT
        if action == SNAPSHOT:
            path = snapshot_dir / f"snapshot_{frame.index:06d}.png"
            saved = cv2.imwrite(str(path), annotated)
            print(f"saved {path}" if saved else f"{path}: could not save", file=sys.stderr)
        if action == PAUSE:
            paused = not paused
        if not paused:
            return None
        action = window.show(annotated, PAUSED_POLL_MS)
