"""Frame rates and latency percentiles, measured the same way for the overlay and the summary."""

from __future__ import annotations

import time
from collections import deque

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
