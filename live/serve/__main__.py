"""python -m live.serve: classify the browser's camera, or a server's own source, from a web page.

Examples:
    python -m live.serve --model build/demo/model      # open http://127.0.0.1:8000/
    python -m live.serve --imagenet --backbone resnet50
    python -m live.serve --backbone alexnet --weights random  # no head: teach classes on the page
    python -m live.serve --model build/demo/model --source rtsp://cam.local/stream   # see /stream
    python -m live.serve --model build/demo/model --host 0.0.0.0 --certfile cert.pem \\
        --keyfile key.pem                              # other machines: HTTPS, and a token
    curl --data-binary @cat.jpg 'http://127.0.0.1:8000/predict?topk=5'
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import secrets
import ssl
import sys
from pathlib import Path

import torch

import live
from extract.errors import UserError, run_cli
from extract.precisions import LIVE_CHOICES
from head import checkpoint
from live.__main__ import default_threads
from live.serve import app
from live.sources import open_source
from live.teaching import MAX_NAME_LENGTH, TEACH_MAX

DEFAULTS = app.Settings()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m live.serve",
        description="Serve a page that classifies the browser's camera frames (sent over a "
        "WebSocket), an HTTP prediction endpoint, and teaching new classes on the spot.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--model",
        type=Path,
        help="checkpoint file, or the folder head.train saved (its best.pt); left out: a head "
        "of taught classes only",
    )
    what.add_argument(
        "--imagenet", action="store_true", help="the pretrained network's own ImageNet classes"
    )
    parser.add_argument(
        "--backbone",
        help="with --imagenet or without --model: the torchvision network (default: alexnet); "
        "with --model the checkpoint names it",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights: imagenet, random or a state_dict file (default: those the "
        "checkpoint records; imagenet without --model)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument(
        "--precision", choices=LIVE_CHOICES, default="fp32", help="fp32 (default) or bf16"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the network (as live's)"
    )
    parser.add_argument("--topk", type=int, default=DEFAULTS.topk, help="labels sent (5)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=DEFAULTS.smooth,
        metavar="ALPHA",
        help="moving average of each client's probabilities, weight of the past (0 = off)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0: any free one)")
    parser.add_argument(
        "--source",
        help="the server's own camera index, video, stream URL or image folder, shown "
        "annotated at /stream and sent on /ws (default: none, the browser's camera)",
    )
    parser.add_argument("--loop", action="store_true", help="restart a --source file at its end")
    parser.add_argument(
        "--token",
        help="asked of every request (?token=...); generated and printed when --host is not "
        "a loopback address",
    )
    parser.add_argument("--certfile", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--keyfile", type=Path, help="its private key (PEM)")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULTS.max_message_bytes,
        help=f"largest image accepted ({DEFAULTS.max_message_bytes}, 8 MB)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULTS.max_pixels,
        help=f"largest width x height accepted, read from the header ({DEFAULTS.max_pixels})",
    )
    parser.add_argument(
        "--max-clients",
        type=int,
        default=DEFAULTS.max_clients,
        help=f"WebSocket clients at once; the next is refused ({DEFAULTS.max_clients})",
    )
    parser.add_argument(
        "--max-name-length",
        type=int,
        default=MAX_NAME_LENGTH,
        help=f"longest taught class name ({MAX_NAME_LENGTH})",
    )
    parser.add_argument(
        "--teach-max",
        type=int,
        default=TEACH_MAX,
        help=f"examples kept per taught class, the oldest dropped ({TEACH_MAX})",
    )
    parser.add_argument(
        "--save-dir",
        type=Path,
        help="where 'save' may write (default: the --model folder; ./taught without --model)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULTS.max_batch,
        help=f"frames of waiting clients classified in one batch ({DEFAULTS.max_batch})",
    )
    args = parser.parse_args(argv)
    for flag in ("topk", "max_message_bytes", "max_pixels", "max_clients", "max_name_length"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("teach_max", "max_batch", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.smooth < 1.0:
        parser.error("--smooth must be in [0, 1)")
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def needed_token(host: str, token: str | None) -> str | None:
    """The token requests must carry: the one given, or a new one when bound beyond loopback."""
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(16)
    return token


def save_dir(args: argparse.Namespace) -> Path:
    if args.save_dir is not None:
        return args.save_dir
    if args.model is None:
        return Path("taught")
    return args.model if args.model.is_dir() else args.model.parent


def checkpoint_file(model: Path) -> Path:
    """The file `--model` names: itself, or the checkpoint in the folder, as head.checkpoint
    loads it (so that 'save' can refuse to overwrite it)."""
    return model / checkpoint.BEST if model.is_dir() else model


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"--certfile {args.certfile} / --keyfile {args.keyfile}: {error}") from None
    return context


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = needed_token(args.host, args.token)
    context = ssl_context(args)
    torch.set_num_threads(args.threads or default_threads(args.device))
    source = open_source(args.source, loop=args.loop) if args.source else None
    predictor = live.load(
        args.model,
        args.device,
        args.weights,
        args.precision,
        backbone=args.backbone,
        imagenet=args.imagenet,
        teach_max=args.teach_max,
        max_name_length=args.max_name_length,
    )
    predictor.classifier.warm_up()
    settings = app.Settings(
        topk=args.topk,
        smooth=args.smooth,
        token=token,
        max_message_bytes=args.max_message_bytes,
        max_pixels=args.max_pixels,
        max_clients=args.max_clients,
        teach_max=args.teach_max,
        save_dir=save_dir(args),
        max_batch=args.max_batch,
        model=None if args.model is None else checkpoint_file(args.model),
    )
    feed = None
    if source is not None:
        from live.serve.stream import Feed

        feed = Feed(source, predictor, args.topk, args.smooth)
    application = app.build(predictor, settings, feed)
    asyncio.run(serve(application, args.host, args.port, context, token))
    return 0


async def serve(application, host: str, port: int, context, token: str | None) -> None:
    """Bind, print the address to open (with the token), and serve until Ctrl-C."""
    from aiohttp import web

    runner = web.AppRunner(application, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise UserError(f"--host {host} --port {port}: cannot listen ({error.strerror})") from None
    bound = runner.addresses[0][1]
    scheme = "https" if context else "http"
    shown = f"[{host}]" if ":" in host else host
    query = f"?token={token}" if token else ""
    print(f"serving on {scheme}://{shown}:{bound}/{query}", flush=True)
    if scheme == "http" and not is_loopback(host):
        print(
            "a browser opens the camera only on localhost or over HTTPS: "
            "use --certfile and --keyfile",
            file=sys.stderr,
            flush=True,
        )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    run_cli(main)
