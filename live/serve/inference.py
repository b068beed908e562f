"""The server's model side: received bytes to pixels, and one thread that runs the network.

Decoding and resizing run in the event loop's thread pool (`decode_received`), the network in one
worker thread of its own (`Worker`), so neither blocks the event loop: a client whose frame is
slow holds up no other client's messages. When several frames wait, the worker takes them all
(up to `max_batch`) through the network in one batch; a batch of 8 AlexNet frames costs less
on the CPU than 8 passes of one. Teaching, forgetting and saving run in the same thread, between
batches, so the predictor is only ever used from that one thread.

An image's bytes are decoded exactly as `live.load(DIR).predict` decodes a file of the same
bytes (`extract.images.pixels_of`, then `extract.preprocess.resize_crop`), so the server's
probabilities are `predict`'s. Before decoding, the header alone is read (PIL opens lazily) to
refuse what is not a JPEG, PNG or WebP image, or has more pixels than allowed: a decompression
bomb never reaches the decoder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import queue
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from extract.images import failure_reason, pixels_of
from extract.preprocess import Preprocess, resize_crop
from live.predictor import Predictor

FORMATS = ("JPEG", "PNG", "WEBP")
STOP_TIMEOUT_S = 5.0
STOP = object()


class BadImage(ValueError):
    """A received image the server refuses; its message is the error reply."""


@dataclasses.dataclass
class Decoded:
    """A received image: its RGB pixels at their own size and resized for the network."""

    rgb: torch.Tensor  # (3, H, W) uint8
    pixels: torch.Tensor  # (3, crop, crop) uint8
    decode_ms: float
    preprocess_ms: float


def decode_received(data: bytes, params: Preprocess, max_pixels: int) -> Decoded:
    """Decode and resize one received image; raises `BadImage` with the reason."""
    if not data:
        raise BadImage("empty message: send one JPEG, PNG or WebP image")
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                image_format, (width, height) = header.format, header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Over PIL's MAX_IMAGE_PIXELS it warns (an error by the filter above); over twice, raises.
        raise BadImage(f"a decompression bomb ({error})") from None
    except Exception:  # anything PIL cannot even identify
        raise BadImage("not a JPEG, PNG or WebP image") from None
    if image_format not in FORMATS:
        raise BadImage(f"a {image_format} image: send JPEG, PNG or WebP")
    if width * height > max_pixels:
        raise BadImage(
            f"image of {width} x {height} pixels: over the limit of {max_pixels} (--max-pixels)"
        )
    try:
        rgb = pixels_of(bytearray(data), "the received image")
    except Exception as error:  # truncated or corrupt after a valid header
        raise BadImage(f"unreadable {image_format} image ({failure_reason(error)})") from None
    decoded = time.perf_counter()
    pixels = resize_crop(rgb, params)
    return Decoded(
        rgb=rgb,
        pixels=pixels,
        decode_ms=(decoded - started) * 1000.0,
        preprocess_ms=(time.perf_counter() - decoded) * 1000.0,
    )


def rgb_array(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) pixels as the H x W x 3 RGB array `Predictor.teach` takes."""
    return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy())


@dataclasses.dataclass(frozen=True)
class Classes:
    """The class list a batch was classified with (what `live.session.class_entry` reads): a
    snapshot, since teaching may change the predictor's list while the reply is written."""

    wnids: list[str | None]
    names: list[str]


@dataclasses.dataclass
class Result:
    """One frame's probabilities and their classes, with the time its batch took."""

    probs: np.ndarray
    classes: Classes
    network_ms: float
    batch: int


class Worker:
    """The one thread that uses the predictor: batches of frames, and calls between them."""

    def __init__(self, predictor: Predictor, max_batch: int = 8):
        self.predictor = predictor
        self.max_batch = max_batch
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="live-serve-network", daemon=True)
        self.thread.start()

    def classify(self, pixels: torch.Tensor) -> concurrent.futures.Future:
        """Queue one (3, crop, crop) uint8 frame; the future's result is a `Result`."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((pixels, future))
        return future

    def call(self, function: Callable, *args) -> concurrent.futures.Future:
        """Run `function(*args)` in the worker thread, after the frames queued before it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((lambda: function(*args), future))
        return future

    def stop(self) -> None:
        self.jobs.put(STOP)
        self.thread.join(STOP_TIMEOUT_S)

    def run(self) -> None:
        waiting = None  # a call (or the stop) taken from the queue while gathering a batch
        while True:
            job, waiting = (waiting, None) if waiting is not None else (self.jobs.get(), None)
            if job is STOP:
                return
            work, future = job
            if callable(work):
                run_into(future, work)
                continue
            frames = [job]
            while len(frames) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is STOP or callable(job[0]):
                    waiting = job  # runs after this batch, in the order it was queued
                    break
                frames.append(job)
            self.run_batch(frames)

    def run_batch(self, frames: list) -> None:
        started = time.perf_counter()
        try:
            probs = self.predictor.classifier.batch_probabilities(
                torch.stack([pixels for pixels, _ in frames])
            )
        except BaseException as error:  # handed to every waiting client
            for _, future in frames:
                future.set_exception(error)
            return
        network_ms = (time.perf_counter() - started) * 1000.0
        classes = Classes(list(self.predictor.wnids), list(self.predictor.names))
        for row, (_, future) in zip(probs, frames):
            future.set_result(Result(row, classes, network_ms, len(frames)))


def run_into(future: concurrent.futures.Future, work: Callable) -> None:
    try:
        future.set_result(work())
    except BaseException as error:  # the caller's to handle
        future.set_exception(error)
