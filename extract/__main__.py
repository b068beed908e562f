"""python -m extract: cache AlexNet fc7 features of an image folder in one HDF5 file.

Examples:
    python -m extract --data tiny-imagenet-200 --out features.h5
    python -m extract --data tiny-imagenet-200 --out features.h5 --splits train,val,test --flip
    python -m extract --data tiny-imagenet-200 --out features.h5 --precision bf16 --device cuda
    python -m extract --data tiny-imagenet-200 --out features.h5 --resume   # after a crash
    python -m extract --data my_images --out features.h5 --weights alexnet_state_dict.pth
    torchrun --nproc-per-node 8 -m extract --data imagenet --out features.h5   # 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from extract import distributed
from extract.errors import UserError, run_cli
from extract.images import DECODERS
from extract.precisions import EXTRACT_CHOICES
from extract.runner import Options, run


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m extract",
        description="Run pretrained AlexNet up to fc7 (4096-d, after the second fully connected "
        "layer and its ReLU, eval mode) over a Tiny ImageNet or ImageFolder dataset and cache "
        "features, labels, paths, classes and provenance in one HDF5 file.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits (default: train,val where present; test also accepted)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (torchvision IMAGENET1K_V1), random (seeded) or a path to "
        "an AlexNet state_dict file (default: imagenet)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (128)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes (default: one per core with CUDA, at most 8 on the CPU)",
    )
    parser.add_argument(
        "--decode",
        default="workers",
        choices=DECODERS,
        help="where JPEG files are decoded: workers (default), or device, batched on the "
        "GPU (docs/speed.md: for photo-sized JPEGs when the workers are the limit)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=EXTRACT_CHOICES,
        help="compute precision; auto = fp32 on CPU, tf32 on CUDA",
    )
    parser.add_argument(
        "--store-dtype",
        default="float16",
        choices=("float16", "float32"),
        help="dtype of the stored features (default: float16)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run, recomputing only what is missing",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (the old file stays until the new one is complete)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error if any image is unreadable, before writing",
    )
    parser.add_argument(
        "--flip", action="store_true", help="also store features of each horizontally flipped image"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    return Options(
        data=args.data,
        out=args.out,
        splits=splits,
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        decode=args.decode,
        precision=args.precision,
        store_dtype=args.store_dtype,
        resume=args.resume,
        overwrite=args.overwrite,
        strict=args.strict,
        flip=args.flip,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    summary = distributed.run(options) if distributed.launched() else run(options)
    if not distributed.launched() or int(os.environ["RANK"]) == 0:
        stream = sys.stderr if summary.already_complete else sys.stdout
        print(summary.line(options.out), file=stream)
    return 0


if __name__ == "__main__":
    run_cli(main)
