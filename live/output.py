"""What a run leaves behind: the annotated video and the per-frame JSONL log."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import cv2
import numpy as np

from extract.errors import UserError, first_line

QUEUED_FRAMES = 8  # about 7 MB of 640x480 frames between the loop and the encoder


class VideoOutput:
    """An mp4v video at the source's frame rate, sized by its first frame; later frames of
    another size (images of a folder) are resized to it.

    Frames are encoded in a thread of their own, fed through a short queue: encoding a 640x480
    frame takes about 4 ms, longer than classifying it on a GPU, and done in the frame loop it
    set the loop's pace. The queue's bound keeps memory flat when the encoder is the slower
    one; the loop then waits for it, so the encoder's own rate is the limit. Frames are written
    in the order given; an error of the encoder surfaces at the next `write` or at `close`.
    """

    def __init__(self, path: Path, fps: float, queued: int = QUEUED_FRAMES):
        self.path = path
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=queued)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def write(self, bgr: np.ndarray) -> None:
        """Queue one frame (the caller hands it over and does not change it afterwards)."""
        self.raise_error()
        if self.writer is None:
            self.open((bgr.shape[1], bgr.shape[0]))
        self.queue.put(bgr)
        self.frames += 1

    def open(self, size: tuple[int, int]) -> None:
        """Open the file here, so a place it cannot be written to is reported at once."""
        self.size = size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = cv2.VideoWriter(
            str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size
        )
        if not self.writer.isOpened():
            raise UserError(
                f"{self.path}: cannot write a video here (use a .mp4 name in a writable folder)"
            )
        self.thread = threading.Thread(target=self.encode, name="live-video-writer", daemon=True)
        self.thread.start()

    def encode(self) -> None:
        while (bgr := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so that a waiting `write` is released
            try:
                if (bgr.shape[1], bgr.shape[0]) != self.size:
                    bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
                self.writer.write(bgr)
            except Exception as error:  # handed to the frame loop's thread
                self.error = error

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise UserError(f"{self.path}: writing the video failed ({first_line(error)})")

    def close(self) -> None:
        """Write what is queued and close the file; raises the encoder's error, if any."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.raise_error()


class FrameLog:
    """One JSON object per classified frame, flushed as it is written (tail -f works)."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "w", encoding="utf-8")
        except OSError as error:
            raise UserError(f"{path}: cannot write the log here ({error.strerror})") from None

    def write(self, record: dict) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
