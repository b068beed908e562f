"""The server's routes: the page, `/ws`, `/predict`, teaching, `/health`, `/classes`, `/stream`.

aiohttp rather than Starlette with uvicorn: one library gives the server, its WebSocket, static
files, a streamed multipart response, and the client the tests and `benchmarks.live --serve`
drive it with; Starlette would need uvicorn to serve and a third package to be a WebSocket client.

Every route is a plain async function below (the teaching commands in `live.serve.commands`,
what they share in `live.serve.state`); the network and the predictor are used only by the
`Worker`'s thread, decoding only in the loop's thread pool, so the event loop just moves bytes.
Every refusal is one JSON reply ``{"error": "..."}`` (with a 4xx status over HTTP) and the
connection goes on: an image too large, not an image, a bomb, text that is not a command.

Protocol, limits, token and HTTPS: docs/live.md, "In the browser".
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from importlib import resources

from aiohttp import WSMsgType, web

from extract.errors import UserError
from live.predictor import Predictor
from live.serve.commands import checked_name, command_reply, forget, save, stop_teaching
from live.serve.inference import BadImage, decode_received, rgb_array
from live.serve.state import (
    STATE,
    Client,
    Settings,
    State,
    class_list,
    error,
    in_worker,
    message_too_large,
    reply_of,
)

__all__ = ["Running", "Settings", "build"]

PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}
FULL = 1013  # WebSocket close code "try again later"


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """The token on every request (query ``token``, ``Authorization: Bearer``, or the cookie the
    page got), and every HTTP error as a JSON ``{"error"}`` reply."""
    token = request.app[STATE].settings.token
    if token is not None:
        given = (
            request.query.get("token")
            or request.headers.get("Authorization", "").removeprefix("Bearer ")
            or request.cookies.get("token", "")
        )
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error("a token is needed: open the URL the server printed (?token=...)", 403)
    try:
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        size = request.content_length or "more"
        return error(message_too_large(size, request.app[STATE].settings.max_message_bytes), 413)
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        return error(http_error.reason, http_error.status)
    if token is not None and request.path == "/":
        response.set_cookie("token", token, httponly=True, samesite="Strict")
    return response


async def page(request: web.Request) -> web.Response:
    name, content_type = PAGE_FILES[request.path]
    text = resources.files("live.serve").joinpath("static", name).read_text(encoding="utf-8")
    return web.Response(text=text, content_type=content_type)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "status": "ok",
            "classes": len(state.predictor.names),
            "clients": state.clients,
            "source": state.feed.description if state.feed else None,
        }
    )


async def classes(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(await in_worker(state, class_list, state.predictor))


async def predict(request: web.Request) -> web.Response:
    """Raw image bytes in the body -> ``{"top": [...], "ms": {...}}``."""
    state = request.app[STATE]
    try:
        topk = int(request.query.get("topk", state.settings.topk))
    except ValueError:
        return error(f"topk={request.query['topk']!r}: must be a whole number >= 1")
    if topk < 1:
        return error(f"topk={topk}: must be >= 1")
    reply = await frame_reply(state, Client(), await request.read(), topk)
    if "error" in reply:
        return error(reply["error"])
    del reply["frame"], reply["smoothed"]
    return web.json_response(reply)


async def frame_reply(state: State, client: Client, data: bytes, topk: int) -> dict:
    """Classify one received image for `client`: its reply, or ``{"error"}``."""
    limit = state.settings.max_message_bytes
    if len(data) > limit:
        return {"error": message_too_large(len(data), limit)}
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        decoded = await loop.run_in_executor(
            state.decoders, decode_received, data, state.predictor.params, state.settings.max_pixels
        )
    except BadImage as bad:
        return {"error": str(bad)}
    result = await asyncio.wrap_future(state.worker.classify(decoded.pixels))
    if client.teaching is not None:
        client.examples = [*client.examples, rgb_array(decoded.rgb)][-state.settings.teach_max :]
    return reply_of(result.classes, client, result.probs, topk, state.settings.smooth) | {
        "ms": {
            "decode": round(decoded.decode_ms, 3),
            "preprocess": round(decoded.preprocess_ms, 3),
            "network": round(result.network_ms, 3),
            "total": round((loop.time() - started) * 1000.0, 3),
        }
    }


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Binary messages are images, answered one by one in order; text messages are commands."""
    state = request.app[STATE]
    limit = state.settings.max_message_bytes
    # Up to twice the limit arrives and is refused with a reply; beyond, aiohttp closes (1009).
    socket = web.WebSocketResponse(max_msg_size=2 * limit)
    await socket.prepare(request)
    if state.clients >= state.settings.max_clients:
        await socket.send_json(
            {
                "error": f"the server is full: {state.settings.max_clients} clients at once "
                f"(--max-clients); try again later"
            }
        )
        await socket.close(code=FULL, message=b"server full")
        return socket
    state.clients += 1
    client = Client()
    forward = asyncio.create_task(forward_feed(state, socket)) if state.feed else None
    try:
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                reply = await frame_reply(state, client, message.data, state.settings.topk)
            elif message.type == WSMsgType.TEXT:
                reply = await command_reply(state, client, message.data)
            else:
                break
            try:
                await socket.send_json(reply)
            except ConnectionResetError:  # the client left while its frame was classified
                break
    finally:
        state.clients -= 1
        if forward:
            forward.cancel()
    return socket


async def forward_feed(state: State, socket: web.WebSocketResponse) -> None:
    """The server's own source: each of its frames' replies, as they come."""
    async for record in state.feed.records():
        if socket.closed:
            return
        try:
            await socket.send_json(record)
        except ConnectionResetError:
            return


async def teach_route(request: web.Request) -> web.Response:
    """POST /teach?name=N with one image as the body: teaches it to N at once."""
    state = request.app[STATE]
    client = Client()
    try:
        client.teaching = checked_name(state, request.query.get("name"))
        reply = await frame_reply(state, client, await request.read(), state.settings.topk)
        if "error" in reply:
            return error(reply["error"])
        return web.json_response(await stop_teaching(state, client))
    except UserError as refused:
        return error(str(refused))


async def forget_route(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        return web.json_response(
            await forget(state, checked_name(state, request.query.get("name")))
        )
    except UserError as refused:
        return error(str(refused))


async def save_route(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        return web.json_response(await save(state, request.query.get("path", ".")))
    except UserError as refused:
        return error(str(refused))


async def stream(request: web.Request) -> web.StreamResponse:
    """The server's source as annotated JPEG frames, one part each (multipart/x-mixed-replace)."""
    feed = request.app[STATE].feed
    if feed is None:
        return error("no --source: this server classifies the frames its clients send", 404)
    response = web.StreamResponse(
        headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"}
    )
    await response.prepare(request)
    async for jpeg in feed.jpegs():
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
        try:
            await response.write(part + jpeg + b"\r\n")
        except ConnectionResetError:  # the viewer left
            break
    return response


def build(predictor: Predictor, settings: Settings, feed=None) -> web.Application:
    """The application: routes, limits, and the worker that is stopped with it."""
    app = web.Application(middlewares=[guard], client_max_size=settings.max_message_bytes)
    state = State(predictor, settings)
    app[STATE] = state
    app.add_routes(
        [
            web.get("/", page),
            web.get("/app.js", page),
            web.get("/health", health),
            web.get("/classes", classes),
            web.get("/ws", websocket),
            web.get("/stream", stream),
            web.post("/predict", predict),
            web.post("/teach", teach_route),
            web.post("/forget", forget_route),
            web.post("/save", save_route),
        ]
    )

    async def start_feed(app: web.Application) -> None:
        if feed is not None:
            state.feed = feed
            feed.start(state.worker, asyncio.get_running_loop())

    async def stop(app: web.Application) -> None:
        if state.feed is not None:
            state.feed.stop()
        state.close()

    app.on_startup.append(start_feed)
    app.on_cleanup.append(stop)
    return app


class Running:
    """A server run in a thread of its own, for tests, benchmarks and scripts: `url`, `stop`."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, ssl=None):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._serve, args=(host, port, ssl, ready), name="live-serve", daemon=True
        )
        self.thread.start()
        if not ready.wait(30) or self.error:
            raise RuntimeError(f"the server did not start: {self.error}")

    def _serve(self, host: str, port: int, ssl, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.error = None
        try:
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, host, port, ssl_context=ssl)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
        except Exception as failed:  # reported to the starting thread
            self.error = failed
            ready.set()
            return
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
