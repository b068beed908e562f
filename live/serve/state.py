"""What the server's routes share: its settings, the state of each client, the predictor's
worker, the reply to a classified frame, and the JSON error reply they answer a refusal with."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from pathlib import Path

import numpy as np
from aiohttp import web

from live.predictor import Predictor
from live.serve.inference import Classes, Worker
from live.session import class_entry, smoothed, top_indices
from live.teaching import TEACH_MAX


@dataclasses.dataclass
class Settings:
    """What the command line sets; the defaults are the command's."""

    topk: int = 5
    smooth: float = 0.0
    token: str | None = None  # None: no token asked (loopback only)
    max_message_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_clients: int = 8
    teach_max: int = TEACH_MAX
    save_dir: Path = Path("taught")
    max_batch: int = 8
    model: Path | None = None  # the checkpoint served, which a save never overwrites


@dataclasses.dataclass
class Client:
    """One WebSocket connection's state: its frame count, its moving average, what it teaches."""

    frames: int = 0
    average: np.ndarray | None = None
    teaching: str | None = None
    examples: list = dataclasses.field(default_factory=list)


class State:
    """What the routes share: the predictor's worker, the settings, the clients connected."""

    def __init__(self, predictor: Predictor, settings: Settings):
        self.predictor = predictor
        self.settings = settings
        self.worker = Worker(predictor, settings.max_batch)
        self.decoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="live-serve-decode"
        )
        self.clients = 0
        self.feed = None  # a live.serve.stream.Feed when the server reads a source itself

    def close(self) -> None:
        self.worker.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)


STATE = web.AppKey("state", State)


def error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def message_too_large(size: int | str, limit: int) -> str:
    return f"message of {size} bytes: over the limit of {limit} (--max-message-bytes)"


async def in_worker(state: State, function, *args):
    """`function(*args)` in the worker's thread, the only one that uses the predictor."""
    return await asyncio.wrap_future(state.worker.call(function, *args))


def class_list(predictor: Predictor) -> dict:
    """The classes in index order, and the taught ones with their number of examples."""
    return {
        "classes": [
            {"index": index, "wnid": wnid, "name": name}
            for index, (wnid, name) in enumerate(zip(predictor.wnids, predictor.names))
        ],
        "taught": predictor.taught,
    }


def reply_of(classes: Classes, client: Client, probs: np.ndarray, topk: int, smooth: float) -> dict:
    """The top-k of this frame's probabilities and the top-1 of the client's moving average,
    as `live`'s log has them; the average restarts when teaching changed the classes."""
    client.average = smoothed(client.average, probs, smooth)
    reply = {
        "frame": client.frames,
        "top": [class_entry(classes, i, probs[i]) for i in top_indices(probs, topk)],
        "smoothed": None,  # a head of taught classes only, none taught yet
    }
    if len(probs):
        best = int(np.argmax(client.average))
        reply["smoothed"] = class_entry(classes, best, client.average[best])
    client.frames += 1
    return reply
