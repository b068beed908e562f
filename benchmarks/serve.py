"""`python -m benchmarks.live --serve`: live.serve under load, against `live --no-display`.

The frames are `benchmarks.live`'s 640x480 video, each encoded once as JPEG (quality 90), and
the model is its random-weights AlexNet with a 200-class head. The server runs in a process of
its own (`live.serve.app.Running`, as `python -m live.serve` serves), bound to 127.0.0.1; the
clients are Python WebSocket clients (aiohttp) in this process, each sending its next frame when
the reply to the previous one has arrived, as the page does.

Measured:
* one client alone: its round trip p50 against the network's own time per frame (the median of
  the replies' ``ms.network``); the target is at most 15 ms more;
* 8 clients at once, each sending every frame: per-client frames per second and round-trip
  p50/p95, and the frames per second over all 8 against `python -m live --no-display` on a
  folder of the same JPEG files, the faster of its default threads and ``--threads 1``
  (target: at least 0.8x);
* every reply is checked: present, in order, and its top-1 is `predict`'s on the same bytes
  (probability within 1e-5).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks import report

JPEG_QUALITY = 90
TOLERANCE = 1e-5
TIMEOUT_S = 120


def write_jpegs(video: Path, folder: Path) -> list[bytes]:
    """Each frame of the video as a JPEG file in `folder`; returns their bytes in order."""
    folder.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
        (folder / f"frame_{len(frames):05d}.jpg").write_bytes(data)
        frames.append(data)
    capture.release()
    return frames


def reference_probabilities(model: Path, folder: Path, device: str) -> np.ndarray:
    """`predict`'s probabilities of every frame file (N, classes), as the server must give."""
    import torch

    import live
    from extract.images import read_pixels
    from extract.preprocess import resize_crop

    predictor = live.load(model, device=device)
    paths = sorted(folder.glob("*.jpg"))
    pixels = torch.stack([resize_crop(read_pixels(path), predictor.params) for path in paths])
    return np.concatenate(
        [
            predictor.classifier.batch_probabilities(pixels[i : i + 32])
            for i in range(0, len(paths), 32)
        ]
    )


def server_main(model: Path, device: str) -> None:
    """The server process: prints its port, serves until its standard input closes."""
    import live
    from live.serve import app

    predictor = live.load(model, device=device)
    predictor.classifier.warm_up()
    running = app.Running(app.build(predictor, app.Settings(topk=1, max_clients=16)))
    print(json.dumps({"port": running.port}), flush=True)
    sys.stdin.read()
    running.stop()


async def client(url: str, frames: list[bytes]) -> dict:
    """Send every frame, one in flight; the replies and their round trips."""
    import aiohttp

    replies, round_trips = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, max_msg_size=0) as socket:
            started = time.perf_counter()
            for data in frames:
                sent = time.perf_counter()
                await socket.send_bytes(data)
                replies.append(await socket.receive_json(timeout=TIMEOUT_S))
                round_trips.append((time.perf_counter() - sent) * 1000.0)
            seconds = time.perf_counter() - started
    return {"replies": replies, "round_trips_ms": round_trips, "seconds": seconds}


async def clients(url: str, frames: list[bytes], count: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(client(url, frames) for _ in range(count)))
    return list(results), time.perf_counter() - started


def wrong_replies(replies: list[dict], reference: np.ndarray) -> int:
    """Replies missing, out of order, or whose top-1 is not `predict`'s (within 1e-5)."""
    wrong = abs(len(replies) - len(reference))
    for index, reply in enumerate(replies[: len(reference)]):
        if "error" in reply or reply["frame"] != index:
            wrong += 1
            continue
        top = reply["top"][0]
        probs = reference[index]
        if (
            abs(top["prob"] - probs[top["index"]]) > TOLERANCE
            or probs[top["index"]] < probs.max() - TOLERANCE
        ):
            wrong += 1
    return wrong


def live_fps(model: Path, folder: Path, device: str, extra: list[str]) -> float:
    """`python -m live --no-display` over the same JPEG files, in a fresh process."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "live",
            "--model",
            str(model),
            "--source",
            str(folder),
            "--no-display",
            "--device",
            device,
            "--topk",
            "1",
            *extra,
        ],
        cwd=report.REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if process.returncode != 0:
        raise SystemExit(f"live failed:\n{process.stderr[-3000:]}")
    return float(process.stdout.split(" fps")[0].rsplit(", ", 1)[1])


def main(scratch: Path, video: Path, model: Path, device: str, client_count: int) -> None:
    folder = scratch / "jpeg"
    frames = write_jpegs(video, folder)
    reference = reference_probabilities(model, folder, device)
    # live with every core and with one thread: on a CPU busy with other work, its two threads
    # can wait on each other (4 against 20 frames/s once); the faster one is the reference.
    live_runs = {
        "live --no-display, same JPEG files": live_fps(model, folder, device, []),
        "live --no-display --threads 1": live_fps(model, folder, device, ["--threads", "1"]),
    }
    plain_fps = max(live_runs.values())
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.live", "--serve-process", "--model", str(model)]
        + ["--device", device],
        cwd=report.REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = json.loads(server.stdout.readline())["port"]
        url = f"ws://127.0.0.1:{port}/ws"
        (alone,), _ = asyncio.run(clients(url, frames, 1))
        loaded, seconds = asyncio.run(clients(url, frames, client_count))
    finally:
        server.stdin.close()
        server.wait(30)
    network_ms = float(np.median([reply["ms"]["network"] for reply in alone["replies"]]))
    alone_p50 = float(np.percentile(alone["round_trips_ms"], 50))
    rows = []
    for name, result in [("1 client alone", alone)] + [
        (f"client {i + 1} of {client_count}", r) for i, r in enumerate(loaded)
    ]:
        p50, p95 = np.percentile(result["round_trips_ms"], [50, 95])
        rows.append(
            [
                name,
                len(result["replies"]),
                wrong_replies(result["replies"], reference),
                len(result["replies"]) / result["seconds"],
                float(p50),
                float(p95),
            ]
        )
    total_fps = sum(len(r["replies"]) for r in loaded) / seconds
    rows.append(
        [
            f"all {client_count} clients",
            client_count * len(frames),
            sum(r[2] for r in rows[1:]),
            total_fps,
            "",
            "",
        ]
    )
    rows += [[name, len(frames), "", fps, "", ""] for name, fps in live_runs.items()]
    report.publish(
        f"live.serve: {client_count} WebSocket clients x {len(frames)} frames 640x480 JPEG, "
        f"{device}",
        ["clients", "replies", "wrong or missing", "frames/s", "round trip p50 ms", "p95 ms"],
        rows,
        f"One client alone: round trip p50 {alone_p50:.1f} ms against the network's own "
        f"{network_ms:.1f} ms per frame (+{alone_p50 - network_ms:.1f} ms; target +15 ms). "
        f"All {client_count} clients: {total_fps:.1f} frames/s, {total_fps / plain_fps:.2f}x "
        f"the faster `live --no-display` on the same files (target 0.8x). Random AlexNet and head "
        f"weights; every reply's top-1 checked against predict on the same bytes.",
    )
