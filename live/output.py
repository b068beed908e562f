"""What a run leaves behind: the annotated video and the per-frame JSONL log."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from extract.errors import UserError


class VideoOutput:
    """An mp4v video at the source's frame rate, sized by its first frame; later frames of
    another size (images of a folder) are resized to it."""

    def __init__(self, path: Path, fps: float):
        self.path = path
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self.size = (bgr.shape[1], bgr.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = cv2.VideoWriter(
                str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size
            )
            if not self.writer.isOpened():
                raise UserError(
                    f"{self.path}: cannot write a video here (use a .mp4 name in a writable folder)"
                )
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


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
