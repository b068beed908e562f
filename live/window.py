"""The on-screen window and its keys: q or Esc quits, space pauses, s saves a snapshot.

On a machine with no display (a server, CI, ssh without X forwarding) there is no window: the
loop runs headless and says so once.
"""

from __future__ import annotations

import os
import sys

import cv2
import numpy as np

QUIT, PAUSE, SNAPSHOT = "quit", "pause", "snapshot"
KEYS = {ord("q"): QUIT, 27: QUIT, ord(" "): PAUSE, ord("s"): SNAPSHOT}


def display_missing() -> str | None:
    """Why no window can be shown here, or None when one can."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    return None


class DisplayFailed(Exception):
    """OpenCV could not show a window although a display seemed available."""


class Window:
    def __init__(self, title: str):
        self.title = title

    def show(self, bgr: np.ndarray, wait_ms: int = 1) -> str | None:
        """Show a frame and return the action of a key pressed meanwhile, if any."""
        try:
            cv2.imshow(self.title, bgr)
            key = cv2.waitKey(wait_ms)
        except cv2.error as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else "cv2.error"
            raise DisplayFailed(message[:160]) from None
        return KEYS.get(key & 0xFF) if key >= 0 else None

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass  # the window may already be gone (closed by the user, display lost)
