"""The on-screen window and its keys: q or Esc quits, space pauses, s saves a snapshot.

On a machine with no display (a server, CI, ssh without X forwarding) there is no window: the
loop runs headless and says so once.
"""

from __future__ import annotations

import os
import socket
import sys

import cv2
import numpy as np

from extract.errors import first_line

QUIT, PAUSE, SNAPSHOT = "quit", "pause", "snapshot"
KEYS = {ord("q"): QUIT, 27: QUIT, ord(" "): PAUSE, ord("s"): SNAPSHOT}


def display_missing() -> str | None:
    """Why no window can be shown here, or None when one can.

    An X display that is set but not reachable (a stale ssh DISPLAY) is checked up front: Qt,
    behind cv2.imshow, aborts the whole process there instead of raising.
    """
    if not sys.platform.startswith("linux"):
        return None
    display, wayland = os.environ.get("DISPLAY"), os.environ.get("WAYLAND_DISPLAY")
    if not (display or wayland):
        return "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    if display and not wayland and not x_server_reachable(display):
        return f"no display (the X server of DISPLAY={display} does not answer)"
    return None


def x_server_reachable(display: str, timeout_s: float = 1.0) -> bool:
    """Whether something listens where DISPLAY points: the local socket, or TCP 6000 + n."""
    host, _, screen = display.rpartition(":")
    number = screen.split(".")[0]
    if not number.isdigit():
        return False
    if host in ("", "unix"):
        addresses = [
            (socket.AF_UNIX, f"\0/tmp/.X11-unix/X{number}"),
            (socket.AF_UNIX, f"/tmp/.X11-unix/X{number}"),
        ]
    else:
        addresses = [(socket.AF_INET, (host, 6000 + int(number)))]
    for family, address in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(timeout_s)
                probe.connect(address)
                return True
        except OSError:
            continue
    return False


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
            raise DisplayFailed(first_line(error)) from None
        return KEYS.get(key & 0xFF) if key >= 0 else None

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass  # the window may already be gone (closed by the user, display lost)
