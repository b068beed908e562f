"""python -m live: classify camera frames, videos, streams or image folders with a trained head.

Examples:
    python -m live --imagenet                  # webcam 0, ImageNet's own labels: camera check
    python -m live --imagenet --backbone resnet50 --source clip.mp4
    python -m live --model build/demo/model    # webcam 0 with the trained head, in a window
    python -m live --model build/demo/model --source 1 --smooth 0.8 --threshold 0.5
    python -m live --model build/demo/model --source clip.mp4 --output labelled.mp4
    python -m live --model build/demo/model --source rtsp://cam.local/stream --no-display \\
        --log frames.jsonl
    python -m live --model build/demo/model --source 'photos/*.jpg' --no-display --log frames.jsonl
    python -m live --model build/demo/model --source build/demo/data/test/images --no-display \\
        --output live.mp4 --log live.jsonl
    python -m live --model build/demo/model --source clip.mp4 --no-display --precision bf16
    python -m live --model build/demo/model --teach mug=photos/mug --teach 'cup=cups/*.jpg'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from extract import backbone
from extract.device import DEFAULT_DEVICE, resolve_device
from extract.errors import UserError, run_cli
from extract.precisions import LIVE_CHOICES, LIVE_DEFAULT
from live import model, session
from live.sources import open_source
from live.teaching import TEACH_MAX
from live.window import Window, display_missing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m live",
        description="Stitch the frozen backbone (from extract) and the trained head (from "
        "head.train) back together and classify frames live, with the labels drawn on the video.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model", type=Path, help="checkpoint file, or the folder head.train saved (its best.pt)"
    )
    what.add_argument(
        "--imagenet",
        action="store_true",
        help="no head: the pretrained network's own 1000 ImageNet classes",
    )
    parser.add_argument(
        "--backbone",
        default=backbone.DEFAULT_BACKBONE,
        help=f"with --imagenet: the torchvision network (default: {backbone.DEFAULT_BACKBONE}); "
        "with --model the "
        "checkpoint names it",
    )
    parser.add_argument(
        "--source",
        default="0",
        help="camera index, video file, stream URL, image folder or glob "
        "(default: 0, the first camera)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights: imagenet, random or a state_dict file (default: "
        "those recorded in the checkpoint; others are refused unless their "
        "sha256 matches; imagenet with --imagenet)",
    )
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help=f"auto, cpu or cuda (default: {DEFAULT_DEVICE})"
    )
    parser.add_argument(
        "--precision",
        choices=LIVE_CHOICES,
        default=LIVE_DEFAULT,
        help=f"compute precision (default: {LIVE_DEFAULT}): fp32, or bf16, faster on CPUs with "
        "bf16 units and on GPUs; probabilities differ slightly from fp32",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the network and preprocessing (default: all cores on the CPU, "
        "1 with CUDA; on a machine busy with other work, fewer can be faster)",
    )
    parser.add_argument(
        "--topk",
        type=int,
        default=session.Settings.topk,
        help=f"labels shown and logged ({session.Settings.topk})",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=session.Settings.smooth,
        metavar="ALPHA",
        help="moving average of the shown probabilities, ALPHA = weight of the "
        "past in [0, 1); 0 = off (default)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=session.Settings.threshold,
        metavar="P",
        help="show 'uncertain' when the top probability is below P (default 0)",
    )
    parser.add_argument(
        "--no-display",
        action="store_true",
        help="no window (automatic when no display is available)",
    )
    parser.add_argument(
        "--teach",
        action="append",
        type=lesson,
        default=[],
        metavar="NAME=IMAGES",
        help="before classifying, teach the class NAME from an image folder, glob or video "
        f"file (its last {TEACH_MAX} frames); repeatable (docs/live.md, Teaching a class)",
    )
    parser.add_argument("--output", type=Path, help="annotated video to write (.mp4)")
    parser.add_argument("--log", type=Path, help="JSONL file, one line per classified frame")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument(
        "--loop",
        action="store_true",
        help="restart video files and folders at the end (with --max-frames or q to stop)",
    )
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error("--topk must be >= 1")
    if not 0.0 <= args.smooth < 1.0:
        parser.error("--smooth must be in [0, 1)")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be in [0, 1]")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error("--max-frames must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def lesson(text: str) -> tuple[str, str]:
    """--teach NAME=IMAGES as (NAME, IMAGES)."""
    name, equals, images = text.partition("=")
    if not equals or not images:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=IMAGES (a folder, glob or video)")
    return name, images


def taught_classifier(args: argparse.Namespace) -> model.Classifier:
    """The classifier with the --teach classes taught, from frames read as --source reads them
    (a camera or a stream never ends, so they are refused)."""
    from live.predictor import BATCH, load

    predictor = load(
        None if args.imagenet else args.model,
        args.device,
        args.weights,
        args.precision,
        backbone=args.backbone if args.imagenet else None,
        imagenet=args.imagenet,
    )
    for name, images in args.teach:
        predictor.lessons.check_name(name)
        if images.isdigit() or "://" in images or images.startswith("/dev/video"):
            raise UserError(f"--teach {name}={images}: give an image folder, glob or video file")
        frames = []
        with open_source(images) as source:
            for frame in source.frames():
                frames.append(frame.bgr)
                if len(frames) == BATCH:
                    predictor.teach(name, frames, bgr=True)
                    frames = []
        count = predictor.teach(name, frames, bgr=True) if frames else predictor.taught[name]
        print(f"taught {name}: {count} examples from {images}")
    return predictor.classifier


def default_threads(device: str) -> int:
    """One thread on CUDA: the CPU only resizes frames there, and more threads contended with
    the read-ahead thread (556 FPS with one against 272 with sixteen, on one H200); every core
    on the CPU (`live.model.default_threads`)."""
    return 1 if resolve_device(device).type == "cuda" else model.default_threads()


def classify(args: argparse.Namespace) -> session.Summary:
    """Open the source, build the classifier, run the loop; the source is released on any exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads(args.device))
    try:
        # The source first: a camera that is not there should not cost the model's loading time.
        with open_source(args.source, loop=args.loop) as source:
            if args.teach:
                classifier = taught_classifier(args)
            elif args.imagenet:
                classifier = model.imagenet(
                    args.weights or "imagenet", args.device, args.precision, args.backbone
                )
            else:
                classifier = model.from_checkpoint(
                    args.model, args.weights, args.device, args.precision
                )
            classifier.warm_up()
            window = None
            if not args.no_display:
                missing = display_missing()
                if missing:
                    print(f"{missing}: running headless", file=sys.stderr)
                else:
                    window = Window(f"live: {source.description}")
            settings = session.Settings(
                topk=args.topk,
                smooth=args.smooth,
                threshold=args.threshold,
                window=window,
                output=args.output,
                log=args.log,
                max_frames=args.max_frames,
            )
            summary = session.run(classifier, source, settings)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its own setting
    if summary.frames == 0:
        if summary.interrupted:
            raise KeyboardInterrupt
        raise UserError(f"{source.description}: no frame could be read")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = classify(args)
    print(summary.line())
    for label, path in (("video", args.output), ("log", args.log)):
        if path:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
