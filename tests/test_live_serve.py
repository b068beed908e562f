"""live.serve: the protocol over WebSocket and HTTP, its limits and token, batching, the stream.

Every server here binds 127.0.0.1 on a free port, runs in a thread of the test process, and every
wait is bounded. The reference is `live.load(DIR).predict` on a file of the same bytes, on the CPU
in fp32; the server's probabilities must equal it within 1e-5.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import types
import zlib
from concurrent.futures import Future
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

import live
from conftest import REPO, pattern_image
from extract.errors import run_cli
from live.serve import app, inference
from live.serve.__main__ import is_loopback, needed_token
from live.serve.__main__ import main as serve_main
from live.serve.stream import Feed
from live.sources import ImageFileFrames, read_bgr

TIMEOUT_S = 30
TOLERANCE = 1e-5  # CPU, fp32


@pytest.fixture(scope="module")
def predictor(model_dir):
    return live.load(model_dir, device="cpu")


@pytest.fixture
def serve(predictor, tmp_path):
    """Start servers of `predictor` with the given settings; all are stopped after the test."""
    running = []

    def start(feed=None, **settings) -> app.Running:
        settings.setdefault("save_dir", tmp_path / "saves")
        server = app.Running(app.build(predictor, app.Settings(**settings), feed))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def encoded(label: int, index: int, fmt: str = "JPEG", size: int = 96) -> bytes:
    buffer = io.BytesIO()
    pattern_image(label, index, size=size).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def reference(predictor, data: bytes, tmp_path: Path, topk: int = 3) -> list[dict]:
    """`predict` on a file holding exactly these bytes."""
    path = tmp_path / f"reference-{abs(hash(data))}.img"
    path.write_bytes(data)
    return predictor.predict(path, topk=topk)


def assert_same_top(reply_top: list[dict], expected: list[dict]) -> None:
    assert [entry["index"] for entry in reply_top] == [entry["index"] for entry in expected]
    assert [entry["name"] for entry in reply_top] == [entry["name"] for entry in expected]
    np.testing.assert_allclose(
        [entry["prob"] for entry in reply_top],
        [entry["prob"] for entry in expected],
        rtol=0,
        atol=TOLERANCE,
    )


async def exchange(url: str, messages: list, **connect) -> list[dict]:
    """Send each message on one WebSocket and collect its reply, in order."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, **connect) as socket:
            replies = []
            for message in messages:
                if isinstance(message, bytes):
                    await socket.send_bytes(message)
                else:
                    await socket.send_str(message)
                replies.append(await socket.receive_json(timeout=TIMEOUT_S))
            return replies


async def post(url: str, data: bytes = b"") -> tuple[int, dict]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, data=data) as response:
            return response.status, await response.json()


async def get(url: str, **options) -> tuple[int, dict | str]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, **options) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


def test_replies_over_ws_and_http_equal_predict_on_the_same_bytes(predictor, serve, tmp_path):
    server = serve(topk=3)
    images = [encoded(0, 1, "JPEG"), encoded(1, 2, "PNG"), encoded(2, 3, "WEBP")]
    replies = asyncio.run(exchange(server.url("/ws"), images))
    for frame, (data, reply) in enumerate(zip(images, replies)):
        assert reply["frame"] == frame
        assert set(reply["ms"]) == {"decode", "preprocess", "network", "total"}
        assert_same_top(reply["top"], reference(predictor, data, tmp_path))
        status, body = asyncio.run(post(server.url("/predict?topk=3"), data))
        assert status == 200
        assert_same_top(body["top"], reference(predictor, data, tmp_path))
    # Negative control: each image's reference differs from the others' replies.
    other = reference(predictor, images[1], tmp_path)
    assert replies[0]["top"][0]["index"] != other[0]["index"]
    status, body = asyncio.run(post(server.url("/predict?topk=1"), images[0]))
    assert len(body["top"]) == 1


def bomb_png() -> bytes:
    """A PNG of 6000 x 6000 black pixels: about 100 kB on the wire, 108 MB decoded."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_each_bad_message_gets_one_error_and_the_next_frame_is_answered(predictor, serve, tmp_path):
    limit = 300_000
    server = serve(topk=3, max_message_bytes=limit, max_pixels=4_000_000)
    good = encoded(1, 7)
    expected = reference(predictor, good, tmp_path)
    truncated = good[: len(good) // 2]
    bad = {
        "garbage": (b"\x00garbage bytes" * 50, "not a JPEG, PNG or WebP image"),
        "empty": (b"", "empty message"),
        "oversized": (b"\xff\xd8\xff" + bytes(limit), "over the limit of 300000"),
        "bomb": (bomb_png(), "6000 x 6000 pixels: over the limit of 4000000 (--max-pixels)"),
        "truncated": (truncated, "unreadable JPEG image"),
        "gif": (gif(), "a GIF image"),
        "not json": ("teach me", "must be a JSON command"),
        "unknown command": ('{"command": "explode"}', "unknown command 'explode'"),
        "save outside": ('{"command": "save", "path": "../escape"}', "outside the save folder"),
        "no name": ('{"command": "forget"}', "a class name is needed"),
    }
    messages = []
    for payload, _ in bad.values():
        messages += [payload, good]
    replies = asyncio.run(exchange(server.url("/ws"), messages))
    for (what, (_, reason)), error, answer in zip(bad.items(), replies[::2], replies[1::2]):
        assert set(error) == {"error"} and reason in error["error"], what
        assert_same_top(answer["top"], expected)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "saves").exists()
    # Over HTTP: a 4xx status with the same JSON error, and the server goes on.
    for what, (payload, reason) in bad.items():
        if isinstance(payload, bytes):
            status, body = asyncio.run(post(server.url("/predict"), payload))
            assert 400 <= status < 500 and reason in body["error"], what
    status, body = asyncio.run(post(server.url("/save?path=/tmp/elsewhere")))
    assert status == 400 and "outside the save folder" in body["error"]
    status, body = asyncio.run(post(server.url("/predict?topk=0"), good))
    assert status == 400 and "topk=0" in body["error"]
    status, body = asyncio.run(post(server.url("/predict?topk=3"), good))
    assert status == 200
    assert_same_top(body["top"], expected)


def test_decode_received_refuses_in_whole_sentences_before_decoding_too_many_pixels(
    predictor, monkeypatch
):
    """CPU. The replies above are matched by a part of the sentence; here the whole of it. The
    pixel limit admits an image of exactly that many pixels, and PIL's own decompression-bomb
    limits (lowered here) refuse before any decoding, whatever --max-pixels allows."""
    params = predictor.params
    png = encoded(1, 7, fmt="PNG")  # 96 x 96

    def refusal(data: bytes, max_pixels: int = 96 * 96) -> str:
        with pytest.raises(inference.BadImage) as refused:
            inference.decode_received(data, params, max_pixels)
        return str(refused.value)

    assert refusal(b"") == "empty message: send one JPEG, PNG or WebP image"
    assert refusal(b"\x00garbage bytes" * 50) == "not a JPEG, PNG or WebP image"
    assert refusal(png, 96 * 96 - 1) == (
        "image of 96 x 96 pixels: over the limit of 9215 (--max-pixels)"
    )
    jpeg = encoded(1, 7)
    assert re.fullmatch(r"unreadable JPEG image \(OSError: .+\)", refusal(jpeg[: len(jpeg) // 2]))
    # Negative control: at the limit itself the image is decoded, as `predict` decodes it.
    decoded = inference.decode_received(png, params, 96 * 96)
    assert decoded.rgb.shape == (3, 96, 96)
    assert decoded.pixels.shape == (3, params.crop_size, params.crop_size)
    # PIL warns of an APNG that declares no frames and reads it as the plain PNG: so does the
    # server (only the bomb's warning is made an error).
    chunk = b"acTL" + bytes(8)  # 0 frames, 0 plays
    apng = png[:33] + struct.pack(">I", 8) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]
    with pytest.warns(UserWarning, match="Invalid APNG"):
        as_png = inference.decode_received(apng, params, 96 * 96)
    assert torch.equal(as_png.rgb, decoded.rgb)
    # PIL warns over MAX_IMAGE_PIXELS and raises over twice it: both are refused.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    for side, pixels in ((70, 4900), (96, 9216)):
        assert refusal(encoded(1, 7, fmt="PNG", size=side), 10**9).startswith(
            f"a decompression bomb (Image size ({pixels} pixels) exceeds limit of "
        )


def test_decode_and_preprocess_times_are_read_from_the_clock_in_milliseconds(
    predictor, monkeypatch
):
    """A clock that reads 10 s, 10.25 s and 10.75 s: decoding took 250 ms, resizing 500 ms."""
    readings = iter([10.0, 10.25, 10.75])
    monkeypatch.setattr(
        inference, "time", types.SimpleNamespace(perf_counter=lambda: next(readings))
    )
    decoded = inference.decode_received(encoded(1, 7), predictor.params, 96 * 96)
    assert (decoded.decode_ms, decoded.preprocess_ms) == (250.0, 500.0)


def gif() -> bytes:
    buffer = io.BytesIO()
    pattern_image(0, 0).save(buffer, format="GIF")
    return buffer.getvalue()


def test_a_message_far_over_the_limit_closes_only_its_own_connection(predictor, serve, tmp_path):
    server = serve(topk=3, max_message_bytes=100_000)
    good = encoded(2, 4)

    async def run() -> tuple[int | None, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url("/ws")) as other:
                async with session.ws_connect(server.url("/ws")) as flooding:
                    await flooding.send_bytes(bytes(250_000))
                    closed = await flooding.receive(timeout=TIMEOUT_S)
                await other.send_bytes(good)
                return closed.data, await other.receive_json(timeout=TIMEOUT_S)

    close_code, reply = asyncio.run(run())
    assert close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert_same_top(reply["top"], reference(predictor, good, tmp_path))


def test_a_token_is_asked_of_every_request_and_the_websocket_upgrade(predictor, serve, tmp_path):
    server = serve(token="s3cret")
    good = encoded(0, 3)
    for path in ("/", "/app.js", "/health", "/classes"):
        status, body = asyncio.run(get(server.url(path)))
        assert status == 403 and "token" in body["error"], path
        status, _ = asyncio.run(get(server.url(path + "?token=s3cret")))
        assert status == 200, path
    status, body = asyncio.run(post(server.url("/predict?token=wrong"), good))
    assert status == 403
    status, _ = asyncio.run(get(server.url("/health"), headers={"Authorization": "Bearer s3cret"}))
    assert status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(exchange(server.url("/ws"), [good]))
    assert refused.value.status == 403
    (reply,) = asyncio.run(exchange(server.url("/ws?token=s3cret"), [good]))
    assert_same_top(reply["top"], reference(predictor, good, tmp_path))

    async def page_then_socket() -> dict:
        """The page's own way: its URL sets a cookie that the script and /ws then carry."""
        # Like a browser, the client keeps cookies of an IP address (aiohttp's "unsafe").
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(server.url("/?token=s3cret")) as response:
                assert response.status == 200
            async with session.get(server.url("/app.js")) as response:
                assert response.status == 200
            async with session.ws_connect(server.url("/ws")) as socket:
                await socket.send_bytes(good)
                return await socket.receive_json(timeout=TIMEOUT_S)

    assert_same_top(asyncio.run(page_then_socket())["top"], reply["top"])


def test_the_client_past_max_clients_is_refused_with_a_message(predictor, serve, tmp_path):
    server = serve(max_clients=2)
    good = encoded(1, 1)

    async def run() -> tuple:
        async with aiohttp.ClientSession() as session:
            first = await session.ws_connect(server.url("/ws"))
            second = await session.ws_connect(server.url("/ws"))
            async with session.ws_connect(server.url("/ws")) as third:
                refusal = await third.receive_json(timeout=TIMEOUT_S)
                closing = await third.receive(timeout=TIMEOUT_S)
            await second.send_bytes(good)
            served = await second.receive_json(timeout=TIMEOUT_S)
            await first.close()
            await asyncio.sleep(0.2)  # the server counts the closed one out
            async with session.ws_connect(server.url("/ws")) as fourth:
                await fourth.send_bytes(good)
                after = await fourth.receive_json(timeout=TIMEOUT_S)
            await second.close()
            return refusal, closing, served, after

    refusal, closing, served, after = asyncio.run(run())
    assert "the server is full: 2 clients at once (--max-clients)" in refusal["error"]
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == app.FULL
    expected = reference(predictor, good, tmp_path)
    assert_same_top(served["top"], expected)
    assert_same_top(after["top"], expected)


def test_clients_sending_at_once_each_get_their_own_frames_answer(predictor, serve, tmp_path):
    server = serve(topk=3)
    images = {
        client: [encoded(client % 3, 10 * client + i) for i in range(4)] for client in range(4)
    }

    async def run() -> dict[int, list[dict]]:
        tasks = [exchange(server.url("/ws"), frames) for frames in images.values()]
        return dict(zip(images, await asyncio.gather(*tasks)))

    for client, replies in asyncio.run(run()).items():
        for data, reply in zip(images[client], replies):
            assert_same_top(reply["top"], reference(predictor, data, tmp_path))


def test_waiting_frames_go_through_the_network_as_one_batch_with_each_its_own_row(predictor):
    worker = inference.Worker(predictor, max_batch=4)
    released = threading.Event()
    try:
        blocker = worker.call(released.wait, TIMEOUT_S)
        pixels = [
            inference.decode_received(encoded(i % 3, i), predictor.params, 10**6).pixels
            for i in range(6)
        ]
        futures = [worker.classify(p) for p in pixels]
        after = worker.call(lambda: "ran after the frames")
        released.set()
        results = [future.result(TIMEOUT_S) for future in futures]
        assert blocker.result(TIMEOUT_S) is True
        assert after.result(TIMEOUT_S) == "ran after the frames" and all(f.done() for f in futures)
    finally:
        worker.stop()
    assert [result.batch for result in results] == [4, 4, 4, 4, 2, 2]
    for pixel, result in zip(pixels, results):
        single = predictor.classifier.probabilities(pixel)
        np.testing.assert_allclose(result.probs, single, rtol=0, atol=TOLERANCE)


def test_a_network_error_reaches_every_frame_of_its_batch_and_the_batch_time_is_the_clocks(
    monkeypatch,
):
    """No network: a stand-in classifier fails the first batch and returns fixed rows for the
    second; a clock that reads 5 s, then 5.125 s, says the second batch took 125 ms."""
    failure = RuntimeError("CUDA out of memory")
    rows = np.eye(3, dtype=np.float32)[:2]
    batches = []

    def batch_probabilities(batch: torch.Tensor) -> np.ndarray:
        batches.append(len(batch))
        if len(batches) == 1:
            raise failure
        return rows

    stand_in = types.SimpleNamespace(
        classifier=types.SimpleNamespace(batch_probabilities=batch_probabilities),
        wnids=["n01", "n02", None],
        names=["one", "two", "three"],
    )

    def frames() -> list:
        return [(torch.zeros(3, 4, 4, dtype=torch.uint8), Future()) for _ in range(2)]

    worker = inference.Worker(stand_in)
    try:
        failed = frames()
        worker.run_batch(failed)
        readings = iter([5.0, 5.125])
        clock = types.SimpleNamespace(perf_counter=lambda: next(readings))
        monkeypatch.setattr(inference, "time", clock)
        answered = frames()
        worker.run_batch(answered)
    finally:
        worker.stop()
    assert batches == [2, 2]
    assert all(future.exception(0) is failure for _, future in failed)
    results = [future.result(0) for _, future in answered]
    assert [(result.network_ms, result.batch) for result in results] == [(125.0, 2)] * 2
    for row, result in zip(rows, results):
        np.testing.assert_array_equal(result.probs, row)
        assert result.classes == inference.Classes(["n01", "n02", None], ["one", "two", "three"])


def test_smoothed_is_each_clients_moving_average_and_top_is_the_frames_own(
    predictor, serve, tmp_path
):
    server = serve(topk=3, smooth=0.75)
    first, second = encoded(0, 1), encoded(2, 2)
    replies = asyncio.run(exchange(server.url("/ws"), [first, second]))
    (p1,), (p2,) = (
        [
            predictor.classifier.probabilities(
                inference.decode_received(d, predictor.params, 10**6).pixels
            )
        ]
        for d in (first, second)
    )
    average = 0.75 * p1 + 0.25 * p2
    assert replies[1]["smoothed"]["index"] == int(np.argmax(average))
    assert replies[1]["smoothed"]["prob"] == pytest.approx(float(average.max()), abs=TOLERANCE)
    assert replies[1]["top"][0]["index"] == int(np.argmax(p2)) != int(np.argmax(average))
    # Another client starts its own average.
    (fresh,) = asyncio.run(exchange(server.url("/ws"), [second]))
    assert fresh["smoothed"]["prob"] == pytest.approx(float(p2.max()), abs=TOLERANCE)


def test_the_servers_source_is_streamed_annotated_and_its_replies_sent_on_ws(
    predictor, serve, tmp_path
):
    folder = tmp_path / "frames"
    folder.mkdir()
    paths = []
    for label in range(3):
        paths.append(folder / f"frame_{label}.png")
        pattern_image(label, label, size=120).save(paths[-1])
    source = ImageFileFrames(paths, str(folder), loop=True)
    source.fps = 50.0
    server = serve(feed=Feed(source, predictor, topk=3, smooth=0.0), topk=3)

    async def run() -> tuple[bytes, list[dict]]:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(server.url("/stream")) as response:
                assert response.content_type == "multipart/x-mixed-replace"
                reader = aiohttp.MultipartReader.from_response(response)
                part = await reader.next()
                assert part.headers["Content-Type"] == "image/jpeg"
                jpeg = await part.read()
            async with session.ws_connect(server.url("/ws")) as socket:
                records = [await socket.receive_json(timeout=TIMEOUT_S) for _ in range(4)]
        return jpeg, records

    jpeg, records = asyncio.run(run())
    shown = Image.open(io.BytesIO(jpeg))
    assert shown.format == "JPEG" and shown.width == 480  # live.overlay enlarges small frames
    for record in records:
        assert record["source"] == str(folder)
        bgr = read_bgr(paths[record["frame"] % 3])
        assert_same_top(record["top"], predictor.predict_bgr(bgr, topk=3))
    status, health = asyncio.run(get(server.url("/health")))
    assert health["source"] == str(folder)


def test_stream_without_a_source_is_a_json_404(serve):
    status, body = asyncio.run(get(serve().url("/stream")))
    assert status == 404 and "no --source" in body["error"]


def test_the_page_and_its_script_are_served_from_the_package_and_fetch_nothing_else(serve):
    server = serve()
    status, page = asyncio.run(get(server.url("/")))
    assert status == 200 and '<script src="app.js">' in page
    status, script = asyncio.run(get(server.url("/app.js")))
    assert status == 200 and "getUserMedia" in script
    for text in (page, script):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def checkerboard(index: int, size: int = 120) -> bytes:
    """A JPEG of a noisy green and magenta checkerboard: nothing like `pattern_image`'s stripes."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size]
    board = ((x // 12 + y // 12) % 2 * 200 + 30).astype(float)
    pixels = np.stack([board, 255 - board, board / 2], axis=-1) + rng.normal(0, 15, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_classes_taught_over_ws_from_scratch_are_predicted_saved_and_forgotten(
    weights_file, tmp_path
):
    predictor = live.load(None, device="cpu", weights=weights_file, backbone="alexnet")
    server = app.Running(app.build(predictor, app.Settings(topk=2, save_dir=tmp_path / "saves")))
    checks = [checkerboard(i) for i in range(6)]
    stripes = [encoded(1, 300 + i, size=120) for i in range(6)]
    try:
        replies = asyncio.run(
            exchange(
                server.url("/ws"),
                [
                    stripes[5],  # no class yet: an empty top, no error
                    '{"command": "teach", "name": "checks"}',
                    *checks[:4],
                    '{"command": "stop"}',
                    '{"command": "teach", "name": "stripes"}',
                    *stripes[:4],
                    '{"command": "stop"}',
                    checks[5],
                    stripes[5],
                    '{"command": "save", "path": "two"}',
                    '{"command": "forget", "name": "checks"}',
                    checks[5],
                    '{"command": "forget", "name": "checks"}',
                    json.dumps({"command": "teach", "name": "x" * 41}),
                    '{"command": "teach", "name": "../up"}',
                    '{"command": "stop"}',
                ],
            )
        )
    finally:
        server.stop()
    assert replies[0]["top"] == [] and replies[0]["smoothed"] is None
    assert replies[1] == {"teaching": "checks"}
    assert replies[6]["learned"] == {"name": "checks", "examples": 4}
    assert replies[12]["learned"] == {"name": "stripes", "examples": 4}
    assert replies[12]["taught"] == {"checks": 4, "stripes": 4}
    assert [c["name"] for c in replies[12]["classes"]] == ["checks", "stripes"]
    # Frames not taught with are told apart (the taught frames' own replies came before).
    assert replies[13]["top"][0]["name"] == "checks"
    assert replies[14]["top"][0]["name"] == "stripes"
    saved = Path(replies[15]["saved"])
    assert saved == (tmp_path / "saves" / "two" / "best.pt").resolve() and saved.is_file()
    assert live.load(saved, device="cpu").names == ["checks", "stripes"]
    assert len(list((saved.parent / "crops" / "checks").glob("*.png"))) == 4
    assert replies[16]["taught"] == {"stripes": 4}
    assert [entry["name"] for entry in replies[17]["top"]] == ["stripes"]
    for refused in replies[18:]:
        assert set(refused) == {"error"}
    assert "40" in replies[19]["error"] and "nothing is being taught" in replies[21]["error"]


def test_http_teach_forget_and_save_refuse_what_ws_refuses(weights_file, tmp_path):
    predictor = live.load(None, device="cpu", weights=weights_file, backbone="alexnet")
    served = tmp_path / "saves" / "model" / "best.pt"
    settings = app.Settings(save_dir=tmp_path / "saves", model=served)
    served.parent.mkdir(parents=True)
    served.write_bytes(b"the served checkpoint")
    server = app.Running(app.build(predictor, settings))
    try:
        status, body = asyncio.run(post(server.url("/teach?name=checks"), checkerboard(1)))
        assert status == 200 and body["learned"] == {"name": "checks", "examples": 1}
        status, body = asyncio.run(post(server.url("/teach?name=a%2Fb"), checkerboard(2)))
        assert status == 400 and "class name" in body["error"]
        status, body = asyncio.run(post(server.url("/teach?name=checks"), b"not an image"))
        assert status == 400 and "not a JPEG" in body["error"]
        status, body = asyncio.run(post(server.url("/save?path=../out")))
        assert status == 400 and "outside the save folder" in body["error"]
        status, body = asyncio.run(post(server.url("/save?path=model")))
        assert status == 400 and "would overwrite the model being served" in body["error"]
        status, body = asyncio.run(post(server.url("/save?path=ok")))
        assert status == 200 and Path(body["saved"]).is_file()
        status, body = asyncio.run(post(server.url("/forget?name=checks")))
        assert status == 200 and body["taught"] == {}
        status, body = asyncio.run(post(server.url("/forget?name=checks")))
        assert status == 400 and "checks" in body["error"]
    finally:
        server.stop()
    assert not (tmp_path / "out").exists()
    assert served.read_bytes() == b"the served checkpoint"


def start_command(*args: str) -> tuple[subprocess.Popen, str]:
    """`python -m live.serve ARGS` on a free port; its process and the URL it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "live.serve", "--port", "0", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=120)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("serving on "):
        process.kill()
        raise AssertionError(f"no address printed: {line!r} {process.communicate(timeout=30)}")
    return process, line.removeprefix("serving on ").strip()


def interrupt(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


@pytest.mark.slow
def test_the_command_serves_predict_with_its_token_and_ends_on_ctrl_c(model_dir, tmp_path):
    process, url = start_command("--model", str(model_dir), "--device", "cpu", "--token", "t0k")
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/?token=t0k")
        base = url.split("?")[0]
        data = encoded(2, 8)
        status, _ = asyncio.run(post(base + "predict", data))
        assert status == 403
        status, body = asyncio.run(post(base + "predict?token=t0k&topk=3", data))
        assert status == 200
        predictor = live.load(model_dir, device="cpu")
        assert_same_top(body["top"], reference(predictor, data, tmp_path))
    finally:
        code, stderr = interrupt(process)
    assert code == 130 and "Traceback" not in stderr


@pytest.mark.slow
def test_the_commands_max_name_length_holds_from_teach_to_stop(weights_file, tmp_path):
    """CPU fp32, random AlexNet weights, no head: with --max-name-length 60 a 50-character class
    is taught end to end (teach, a frame, stop -> learned), as the refit at stop checks the same
    length the command was given; 61 characters are still refused, at teach."""
    process, url = start_command(
        *("--backbone", "alexnet", "--weights", str(weights_file), "--device", "cpu"),
        *("--max-name-length", "60", "--save-dir", str(tmp_path / "saves")),
    )
    name = "n" * 50
    try:
        replies = asyncio.run(
            exchange(
                url + "ws",
                [
                    json.dumps({"command": "teach", "name": name}),
                    checkerboard(1),
                    '{"command": "stop"}',
                    json.dumps({"command": "teach", "name": "m" * 61}),
                ],
            )
        )
    finally:
        code, stderr = interrupt(process)
    assert replies[0] == {"teaching": name}
    assert replies[2].get("learned") == {"name": name, "examples": 1}, replies[2]
    assert replies[2]["taught"] == {name: 1}
    assert set(replies[3]) == {"error"} and "1 to 60 characters" in replies[3]["error"]
    assert code == 130 and "Traceback" not in stderr


def test_only_a_loopback_bind_goes_without_a_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host) and needed_token(host, None) is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "myhost.example"):
        assert not is_loopback(host)
        first, second = needed_token(host, None), needed_token(host, None)
        assert len(first) >= 16 and first != second
    assert needed_token("0.0.0.0", "given") == needed_token("127.0.0.1", "given") == "given"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--certfile", "cert.pem"], "--certfile and --keyfile go together"),
        (["--max-clients", "0"], "--max-clients must be >= 1"),
        (["--smooth", "1"], "--smooth must be in [0, 1)"),
        (["--certfile", "missing.pem", "--keyfile", "missing.pem"], "--certfile missing.pem"),
    ],
)
def test_bad_flags_are_one_line_and_exit_status_2(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(serve_main, ["--port", "0", *args])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and message in stderr.splitlines()[-1]  # after argparse's usage
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
def test_https_with_certfile_and_keyfile(model_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    process, url = start_command(
        "--model", str(model_dir), "--device", "cpu", "--certfile", str(cert), "--keyfile", str(key)
    )
    try:
        assert url.startswith("https://127.0.0.1:")
        status, page = asyncio.run(get(url, ssl=False))  # self-signed: not verified
        assert status == 200 and "app.js" in page
        with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
            asyncio.run(get(url.replace("https:", "http:")))
    finally:
        interrupt(process)
