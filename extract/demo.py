"""python -m extract.demo: write the built-in demo dataset and pick the weights the demo can use.

The dataset is scikit-learn's bundled handwritten digits (1,797 images, 10 classes) upscaled to
64x64 colour JPEG files in the Tiny ImageNet layout, so the whole pipeline can be tried on a
machine with no internet. It prints the ``--weights`` value to use: ``imagenet`` when the
pretrained weights can be had, otherwise ``random``, with one line on stderr saying why.

Examples:
    python -m extract.demo --out build/demo/data
    W=$(python -m extract.demo --out build/demo/data) && python -m extract --weights $W ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from extract import backbone
from extract.errors import UserError, run_cli

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 64
VAL_PER_CLASS = 20
TEST_PER_CLASS = 10


def digit_image(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (0..16) as a 64x64 RGB image: coloured ink on a coloured background."""
    ink = rng.integers(0, 256, size=3)
    paper = 255 - ink // 2
    mask = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC
    )
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    rgb = paper * (1 - alpha) + ink * alpha + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def write_dataset(out: str | os.PathLike, seed: int = 0, train_per_class: int | None = None) -> int:
    """Write the digits in Tiny ImageNet layout under `out`; returns the number of images.

    Each class gives its first 20 images to val and the next 10 to test; the rest (about 150)
    are train, or only the first `train_per_class` of them, for a demo that runs in seconds.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    wnids = [f"digit{label}" for label in range(10)]
    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    (out / "test" / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (out / "words.txt").write_text(
        "".join(f"{w}\t{name}, {label}\n" for label, (w, name) in enumerate(zip(wnids, NAMES)))
    )
    annotations = []
    first_train = VAL_PER_CLASS + TEST_PER_CLASS
    written = 0
    for label, wnid in enumerate(wnids):
        (out / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        members = np.flatnonzero(digits.target == label)
        for position, index in enumerate(members):
            image = digit_image(digits.images[index], rng)
            if position < VAL_PER_CLASS:
                name = f"val_{index}.JPEG"
                image.save(out / "val" / "images" / name, quality=90)
                annotations.append(f"{name}\t{wnid}\t0\t0\t{IMAGE_SIZE - 1}\t{IMAGE_SIZE - 1}\n")
            elif position < first_train:
                image.save(out / "test" / "images" / f"test_{index}.JPEG", quality=90)
            elif train_per_class is None or position < first_train + train_per_class:
                image.save(out / "train" / wnid / "images" / f"{wnid}_{index}.JPEG", quality=90)
            else:
                continue
            written += 1
    (out / "val" / "val_annotations.txt").write_text("".join(annotations))
    return written


def pick_weights() -> str:
    """``imagenet`` if the pretrained weights load (cache or download), else ``random``."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        # torch.hub prints "Downloading: ..." on stdout, where only the answer may go.
        with contextlib.redirect_stdout(io.StringIO()):
            backbone.load_network(backbone.DEFAULT_BACKBONE, backbone.IMAGENET)
        return "imagenet"
    except UserError as error:
        print(f"demo: {error}; using --weights random", file=sys.stderr)
        return "random"
    finally:
        socket.setdefaulttimeout(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extract.demo",
        description=__doc__.split("\n\n")[1],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset to")
    args = parser.parse_args(argv)
    if (args.out / "wnids.txt").is_file():
        print(f"demo: {args.out} already holds the demo dataset", file=sys.stderr)
    else:
        count = write_dataset(args.out)
        print(f"demo: wrote {count} digit images to {args.out}", file=sys.stderr)
    print(pick_weights())
    return 0


if __name__ == "__main__":
    run_cli(main)
