"""The server's own source (``--source``): a camera, video, stream or folder nobody can see.

A thread reads the source with `live.sources`, prepares each frame with `live.model.frame_pixels`
(as `live` does), has the worker classify it, and draws it with `live.overlay` as `live` would.
The newest annotated JPEG and its reply are handed to the event loop; every `/stream` viewer
and `/ws` client gets each one as it comes (a slow viewer skips frames, never lags behind).
Recorded sources (files, folders) are paced to their frame rate, so they play, not race.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import cv2

from live import overlay
from live.model import frame_pixels
from live.predictor import Predictor
from live.serve.inference import Worker
from live.serve.state import Client, reply_of
from live.session import top_indices
from live.sources import Source
from live.timing import RateMeter

JPEG_QUALITY = 85
STOP_TIMEOUT_S = 5.0


class Feed:
    """The source's frames, classified and drawn, for any number of viewers."""

    def __init__(self, source: Source, predictor: Predictor, topk: int, smooth: float):
        self.source = source
        self.predictor = predictor
        self.topk = topk
        self.smooth = smooth
        self.description = source.description
        self.latest: tuple[bytes, dict] | None = None
        self.changed: asyncio.Event | None = None
        self.ended = False
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.changed = asyncio.Event()
        self.thread = threading.Thread(
            target=self.run, args=(worker, loop), name="live-serve-source", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(STOP_TIMEOUT_S)
        self.source.release()

    def run(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        rate = RateMeter()
        client = Client()  # the source's own moving average
        try:
            for frame in self.source.frames():
                if self.stopping.is_set():
                    return
                result = worker.classify(frame_pixels(frame.bgr, self.predictor.params)).result()
                done = time.perf_counter()
                rate.tick(done)
                reply = reply_of(result.classes, client, result.probs, self.topk, self.smooth)
                if not len(result.probs):
                    continue  # a head of taught classes only, none taught yet
                latency_ms = (done - frame.captured) * 1000.0
                record = reply | {
                    "frame": frame.index,  # the source's frame number
                    "ms": {"network": round(result.network_ms, 3), "total": round(latency_ms, 3)},
                    "source": self.description,
                }
                average = client.average
                shown = top_indices(average, self.topk)
                annotated = overlay.annotate(
                    frame.bgr,
                    [(result.classes.names[i], float(average[i])) for i in shown],
                    overlay.status_line(self.source.rate.rate, rate.rate, latency_ms),
                )
                jpeg = cv2.imencode(".jpg", annotated, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
                loop.call_soon_threadsafe(self.publish, jpeg.tobytes(), record)
                if not self.source.live:  # play a recorded source at its own rate
                    self.stopping.wait(
                        max(0.0, 1.0 / self.source.fps - (time.perf_counter() - done))
                    )
        finally:
            try:
                loop.call_soon_threadsafe(self.end)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

    def publish(self, jpeg: bytes, record: dict) -> None:
        self.latest = (jpeg, record)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def end(self) -> None:
        self.ended = True
        self.changed.set()

    async def frames(self) -> AsyncIterator[tuple[bytes, dict]]:
        """Each new frame as it comes, until the source ends."""
        while not self.ended:
            changed = self.changed
            await changed.wait()
            if self.latest is not None:
                yield self.latest

    async def jpegs(self) -> AsyncIterator[bytes]:
        async for jpeg, _ in self.frames():
            yield jpeg

    async def records(self) -> AsyncIterator[dict]:
        async for _, record in self.frames():
            yield record
