"""live.serve: the protocol over WebSocket and HTTP, its limits and token, batching, the stream.

Every server here binds 127.0.0.1 on a free port, runs in a thread of the test process, and every
wait is bounded. The reference is `live.load(DIR).predict` on a file of the same bytes, on the CPU
in fp32; the server's probabilities must equal it within 1e-5.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

import live
from conftest import pattern_image
from live.serve import app, inference
from live.serve.stream import Feed
from live.sources import ImageFileFrames, read_bgr

TIMEOUT_S = 30
TOLERANCE = 1e-5  # CPU, fp32

needs_teaching = pytest.mark.skipif(
    not hasattr(live.Predictor, "teach"), reason="live.Predictor.teach is not in this build"
)


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
            inference.pixels_of(encoded(i % 3, i), predictor.params, 10**6).pixels for i in range(6)
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


def test_smoothed_is_each_clients_moving_average_and_top_is_the_frames_own(
    predictor, serve, tmp_path
):
    server = serve(topk=3, smooth=0.75)
    first, second = encoded(0, 1), encoded(2, 2)
    replies = asyncio.run(exchange(server.url("/ws"), [first, second]))
    (p1,), (p2,) = (
        [predictor.classifier.probabilities(inference.pixels_of(d, predictor.params, 10**6).pixels)]
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


@needs_teaching
def test_a_class_taught_over_ws_is_predicted_forgotten_and_saved(model_dir, tmp_path):
    predictor = live.load(model_dir, device="cpu")  # its own: teaching changes it
    server = app.Running(app.build(predictor, app.Settings(topk=3, save_dir=tmp_path / "saves")))
    taught = [encoded(0, 300 + i, size=120) for i in range(5)]
    messages = ['{"command": "teach", "name": "my cup"}', *taught, '{"command": "stop"}']
    messages += [taught[0], '{"command": "save", "path": "cup"}']
    replies = asyncio.run(exchange(server.url("/ws"), messages))
    assert replies[0] == {"teaching": "my cup"}
    assert replies[6]["learned"] == {"name": "my cup", "examples": 5}
    assert replies[6]["taught"] == {"my cup": 5}
    assert replies[7]["top"][0]["name"] == "my cup"
    saved = Path(replies[8]["saved"])
    assert saved == (tmp_path / "saves" / "cup" / "best.pt").resolve() and saved.is_file()
    assert "my cup" in live.load(saved, device="cpu").names
    name_error, forgot, unknown = asyncio.run(
        exchange(
            server.url("/ws"),
            [
                json.dumps({"command": "teach", "name": "x" * 41}),
                '{"command": "forget", "name": "my cup"}',
                '{"command": "forget", "name": "my cup"}',
            ],
        )
    )
    server.stop()
    assert "error" in name_error and "error" not in forgot and "error" in unknown
    assert "my cup" not in predictor.names
