"""Where frames come from: cameras, streams, video files, image folders and globs.

Two kinds of source, because they are used differently:

* live (camera index, ``/dev/video*``, stream URL): a capture thread reads as fast as the device
  delivers and keeps only the newest frame. The loop always classifies the freshest frame (no lag
  from a queue of stale ones), never the same frame twice, and every frame overwritten before it
  was classified is counted as dropped.
* recorded (video file, image folder, glob, one image): every frame, in order, as fast as the
  loop takes them, so that two runs over the same file log the same thing. `read_ahead` decodes
  and preprocesses the next frame in a thread while the network works on this one.

Images are decoded with PIL and `extract.preprocess.to_rgb`, like extraction decodes them, then
turned into BGR so that every source hands the loop the same kind of frame.

Every source is a context manager; leaving it releases the capture, whatever happened.
"""

from __future__ import annotations

import dataclasses
import glob
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from extract.dataset import is_image, list_images
from extract.errors import UserError
from extract.images import failure_reason
from extract.preprocess import to_rgb
from live.timing import RateMeter

DEFAULT_FPS = 10.0  # frame rate for image folders, and for devices that do not report one
STOP_TIMEOUT_S = 2.0
# Read-ahead pacing: start the next frame PACE_MARGIN times its last read-and-prepare time plus
# PACE_SLACK_S before the fastest of the caller's last PACE_WINDOW passes would end.
PACE_WINDOW = 10
PACE_MARGIN = 1.5
PACE_SLACK_S = 0.002

Prepared = TypeVar("Prepared")

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we say what failed, once


@dataclasses.dataclass
class Frame:
    """One BGR frame; `index` is its position in the source (for a camera: its capture count,
    so gaps in the log are the dropped frames)."""

    index: int
    bgr: np.ndarray
    captured: float  # time.perf_counter() when it was read
    path: str | None = None  # the image file, for folders and globs


class Source:
    """What the loop needs of any source; subclasses fill in `frames` and `release`."""

    live = False

    def __init__(self, description: str, fps: float = DEFAULT_FPS):
        self.description = description
        self.fps = fps  # the source's own frame rate, for the annotated output video
        self.dropped = 0
        self.rate = RateMeter()  # frames the source delivers per second

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def open_source(spec: str, loop: bool = False) -> Source:
    """Pick the source for a ``--source`` value; raises `UserError` for what cannot be opened."""
    if spec.isdigit():
        return LiveCapture(int(spec), f"camera {spec}")
    if "://" in spec or spec.startswith("/dev/video"):
        return LiveCapture(spec, spec)
    path = Path(spec)
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise UserError(f"{path}: no images in this folder")
        return ImageFileFrames(images, str(path), loop)
    if path.is_file():
        if is_image(path):
            return ImageFileFrames([path], str(path), loop)
        return VideoFile(path, loop)
    if any(char in spec for char in "*?["):
        images = [
            Path(name)
            for name in sorted(glob.glob(spec, recursive=True))
            if is_image(Path(name)) and Path(name).is_file()
        ]
        if not images:
            raise UserError(f"{spec}: no image files match")
        return ImageFileFrames(images, spec, loop)
    raise UserError(f"{spec}: no such file or folder (a camera is a number, a stream a URL)")


def open_capture(target: int | str, description: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        if isinstance(target, int):
            raise UserError(f"{description} cannot be opened (no such camera, or it is in use)")
        if "://" in str(target):
            raise UserError(f"{description}: stream cannot be opened")
        raise UserError(
            f"{description}: cannot be read as a video (not a video file, or a "
            f"codec this OpenCV lacks)"
        )
    return capture


def reported_fps(capture: cv2.VideoCapture) -> float:
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if 1.0 <= fps <= 1000.0 else DEFAULT_FPS


class VideoFile(Source):
    """Every frame of a video file, in order; with `loop`, from the start again at the end."""

    def __init__(self, path: Path, loop: bool = False):
        self.path = path
        self.loop = loop
        self.capture = open_capture(str(path), str(path))
        super().__init__(str(path), reported_fps(self.capture))

    def frames(self) -> Iterator[Frame]:
        index = 0
        read_this_pass = 0
        while True:
            ok, bgr = self.capture.read()
            if not ok:
                if not (self.loop and read_this_pass):
                    return
                self.capture.release()
                self.capture = open_capture(str(self.path), str(self.path))
                read_this_pass = 0
                continue
            now = time.perf_counter()
            self.rate.tick(now)
            yield Frame(index, bgr, now)
            index += 1
            read_this_pass += 1

    def release(self) -> None:
        self.capture.release()


def read_bgr(path: Path) -> np.ndarray:
    """Decode an image as extraction does (PIL, any mode to RGB), then to OpenCV's BGR."""
    with Image.open(path) as image:
        rgb = np.asarray(to_rgb(image))
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


class ImageFileFrames(Source):
    """Frames read from image files (a folder or a glob), in the given order; an unreadable one is
    reported on stderr and skipped."""

    def __init__(self, paths: list[Path], description: str, loop: bool = False):
        super().__init__(description)
        self.paths = paths
        self.loop = loop
        self.unreadable = 0

    def frames(self) -> Iterator[Frame]:
        index = 0
        while True:
            read_this_pass = 0
            for path in self.paths:
                try:
                    bgr = read_bgr(path)
                except Exception as error:  # every decoder error is a property of the file
                    self.unreadable += 1
                    print(f"{path}: skipped, {failure_reason(error)}", file=sys.stderr)
                    continue
                now = time.perf_counter()
                self.rate.tick(now)
                yield Frame(index, bgr, now, str(path))
                index += 1
                read_this_pass += 1
            if not (self.loop and read_this_pass):
                return

    def release(self) -> None:
        """Nothing stays open between frames."""


class LiveCapture(Source):
    """A camera or stream read by a thread that keeps only the newest frame."""

    live = True

    def __init__(
        self,
        target: int | str,
        description: str,
        open_capture: Callable[[int | str, str], cv2.VideoCapture] = open_capture,
    ):
        self.capture = open_capture(target, description)
        super().__init__(description, reported_fps(self.capture))
        self.captured = 0
        self._newest: Frame | None = None
        self._ended = False
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def _read_until_stopped(self) -> None:
        try:
            while not self._stop.is_set():
                ok, bgr = self.capture.read()
                if not ok:
                    return
                now = time.perf_counter()
                self.rate.tick(now)
                with self._changed:
                    if self._newest is not None:
                        self.dropped += 1
                    self._newest = Frame(self.captured, bgr, now)
                    self.captured += 1
                    self._changed.notify()
        finally:
            self.capture.release()  # here, so a read in progress never races the release
            with self._changed:
                self._ended = True
                self._changed.notify()

    def frames(self) -> Iterator[Frame]:
        """The newest frame each time; starts capturing on first use, ends with the stream."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._read_until_stopped, name="live-capture", daemon=True
            )
            self._thread.start()
        while True:
            with self._changed:
                while self._newest is None and not self._ended:
                    self._changed.wait()
                frame, self._newest = self._newest, None
            if frame is None:
                return
            yield frame

    def release(self) -> None:
        if self._thread is None:
            self.capture.release()
            return
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S)


def read_ahead(
    frames: Iterator[Frame], prepare: Callable[[Frame], Prepared]
) -> Iterator[tuple[Frame, Prepared]]:
    """Frames with `prepare(frame)`, read and prepared one frame ahead in a thread, in order.

    While the caller works on frame n, the thread reads and prepares frame n + 1, starting as
    late as still has it ready when the caller comes back (paced by the caller's fastest recent
    pass): decoding and preprocessing overlap the caller's work, yet a frame is read just before
    it is needed, so its latency is not stretched by waiting in line. The thread alone runs
    `frames`; when the caller stops (end, break, error or Ctrl-C) the thread is stopped and
    joined before this returns, so the source can be released without racing a read.
    """
    requests: queue.SimpleQueue[float | None] = queue.SimpleQueue()  # when a frame was taken
    ready: queue.SimpleQueue = queue.SimpleQueue()
    ended = object()

    def produce() -> None:
        passes: deque[float] = deque(maxlen=PACE_WINDOW)  # the caller's recent times per frame
        taken = None
        produce_s = 0.0
        try:
            while (request := requests.get()) is not None:
                if taken is not None:
                    passes.append(request - taken)
                    time.sleep(
                        max(
                            0.0,
                            request
                            + min(passes)
                            - PACE_MARGIN * produce_s
                            - PACE_SLACK_S
                            - time.perf_counter(),
                        )
                    )
                taken = request
                begin = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    break
                ready.put((frame, prepare(frame)))
                produce_s = time.perf_counter() - begin
        except BaseException as error:  # handed to the caller, raised there
            ready.put(error)
        finally:
            ready.put(ended)
            getattr(frames, "close", lambda: None)()

    thread = threading.Thread(target=produce, name="live-read-ahead", daemon=True)
    thread.start()
    requests.put(time.perf_counter())
    try:
        while True:
            item = ready.get()
            if item is ended:
                return
            if isinstance(item, BaseException):
                raise item
            requests.put(time.perf_counter())
            yield item
    finally:
        requests.put(None)
        thread.join(STOP_TIMEOUT_S)
