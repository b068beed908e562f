"""Drawing the prediction on the frame: top-k names with probabilities, frame rates, latency.

Frames narrower than `MIN_WIDTH` (64x64 test images, thumbnails) are enlarged first so the text
stays readable; the source frame itself is never drawn on.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_WIDTH = 480
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
ORANGE = (0, 165, 255)  # BGR
BLACK = (0, 0, 0)


def annotate(
    bgr: np.ndarray, labels: list[tuple[str, float]], status: str, uncertain: bool = False
) -> np.ndarray:
    """A copy of the frame with `labels` (name, probability), best first, and a status line.

    With `uncertain` the best label is not trusted: the list is headed by "uncertain".
    """
    if bgr.shape[1] < MIN_WIDTH:
        scale = MIN_WIDTH / bgr.shape[1]
        canvas = cv2.resize(
            bgr, (MIN_WIDTH, round(bgr.shape[0] * scale)), interpolation=cv2.INTER_NEAREST
        )
    else:
        canvas = bgr.copy()
    height, width = canvas.shape[:2]
    font_scale = max(0.45, width / 1280)
    thickness = 1 if font_scale < 0.8 else 2
    line_height = int(30 * font_scale) + 6
    lines = [(f"{name} {prob:.2f}", WHITE) for name, prob in labels]
    if uncertain:
        lines.insert(0, ("uncertain", ORANGE))
    for row, (text, colour) in enumerate(lines):
        put_text(canvas, text, (8, (row + 1) * line_height), font_scale, colour, thickness)
    put_text(canvas, status, (8, height - 8), font_scale * 0.8, WHITE, thickness)
    return canvas


def put_text(
    canvas: np.ndarray,
    text: str,
    origin: tuple[int, int],
    scale: float,
    colour: tuple[int, int, int],
    thickness: int,
) -> None:
    """Text over a dark box, readable on any background."""
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = origin
    cv2.rectangle(canvas, (x - 4, y - height - 4), (x + width + 4, y + baseline + 2), BLACK, -1)
    cv2.putText(canvas, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def status_line(camera_fps: float, inference_fps: float, latency_ms: float) -> str:
    """The overlay's timing line. A rate needs two frames to be measured: until then it is
    shown as unknown ("--"), not as 0.0 fps."""
    return (
        f"camera {rate_text(camera_fps)}  inference {rate_text(inference_fps)}  {latency_ms:.0f} ms"
    )


def rate_text(fps: float) -> str:
    return f"{fps:.1f} fps" if fps > 0 else "-- fps"
