"""Writing rows in a background thread, so the device computes the next batch meanwhile.

Batches are written in the order they were submitted, each through `extract.store.append`,
so the crash-safety protocol is unchanged: a batch still in the queue when the process dies
is simply recomputed by --resume. On CUDA the copy to host memory is started without waiting
and the writer thread waits for it, so the GPU never idles on a host-side write.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from extract import store

QUEUED_BATCHES = 3


class HostRows:
    """Features on their way to host memory; `numpy()` waits for the copy to land."""

    def __init__(self, features: torch.Tensor, dtype: np.dtype):
        cast = features.to(torch.float16 if dtype == np.float16 else torch.float32)
        self.event = None
        if cast.is_cuda:
            self.rows = cast.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.rows = cast

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.rows.numpy()


class BackgroundWriter:
    """A single writer thread fed through a short queue; errors surface in the caller."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.work, name="hdf5-writer", daemon=True)
        self.thread.start()

    def work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as error:  # handed to the submitting thread
                    self.error = error

    def submit(
        self,
        group,
        features: HostRows | None,
        flipped: HostRows | None,
        labels: list[int],
        paths: list[str],
        failed: list[tuple[str, str]],
        next_index: int,
    ) -> None:
        self.raise_error()
        job: Callable[[], None] = lambda: store.append(  # noqa: E731
            group,
            None if features is None else features.numpy(),
            None if flipped is None else flipped.numpy(),
            labels,
            paths,
            failed,
            next_index,
        )
        self.jobs.put(job)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every queued batch to be written; re-raise a write error."""
        self.jobs.put(None)
        self.thread.join()
        self.raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
        else:  # stop quietly; the error already on its way up is the one to report
            self.jobs.put(None)
            self.thread.join()
