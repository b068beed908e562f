"""Frame rates and latency percentiles, measured the same way for the overlay and the summary."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np


class RateMeter:
    """Events per second over the last `window` events (a camera's frames, classified frames)."""

    def __init__(self, window: int = 30):
        self.times: deque[float] = deque(maxlen=window)

    def tick(self, now: float | None = None) -> None:
        self.times.append(time.perf_counter() if now is None else now)

    @property
    def rate(self) -> float:
        times = list(self.times)  # a snapshot: the capture thread may tick meanwhile
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])


def percentiles(latencies_ms: list[float]) -> tuple[float, float]:
    """p50 and p95 of the per-frame latencies; (0, 0) when there are none."""
    if not latencies_ms:
        return 0.0, 0.0
    p50, p95 = np.percentile(np.asarray(latencies_ms), [50, 95])
    return float(p50), float(p95)


class StageTimes:
    """Seconds spent in each named stage of the frame loop, timed from any thread."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - begin
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

    def per_frame_ms(self, frames: int, order: tuple[str, ...]) -> dict[str, float]:
        """Mean milliseconds per frame of each stage that ran, in `order`."""
        with self._lock:
            return {
                stage: self.seconds[stage] * 1000.0 / max(frames, 1)
                for stage in order
                if stage in self.seconds
            }
