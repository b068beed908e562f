"""python -m head.train: train the new classification layer on cached backbone features.

Examples:
    python -m head.train --features features.h5 --save model
    python -m head.train --features features.h5 --save model --epochs 25 --device cuda
    python -m head.train --features features.h5 --save model --resume --epochs 50
    python -m head.train --features features.h5 --save model --init fc8 --standardize
    python -m head.train --features resnet50.h5 --save model --init classifier
    python -m head.train --features features.h5 --save model --flip   # features from --flip
    python -m head.train --features features.h5 --save model --stream --max-memory 2GB
    python -m head.train --features features.h5 --save model --precision bf16   # faster on CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.device import DEFAULT_DEVICE
from extract.errors import run_cli
from extract.precisions import HEAD_CHOICES
from head import features
from head.api import fit
from head.settings import INITS, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m head.train",
        description="Train one linear layer (D features -> classes, D as recorded in the file) "
        "with Adam on the cross-entropy of its logits, from the features cached by "
        "`python -m extract` (AlexNet's fc7 by default). Writes last.pt every "
        "epoch, best.pt at the best val top-1, history.csv and loss/accuracy/time plots.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"Adam learning rate (default: {defaults.lr})"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help=f"Adam weight decay (default: {defaults.weight_decay:g})",
    )
    parser.add_argument(
        "--standardize",
        action="store_true",
        help="train on features standardised with train statistics; the saved "
        "layer has them folded in and takes raw features",
    )
    return parser.parse_args(argv)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `head.train` and `head.sweep` share, with the same meaning and defaults."""
    defaults = Settings()
    parser.add_argument("--features", type=Path, required=True, help="HDF5 file from extract")
    parser.add_argument("--save", type=Path, required=True, help="folder for checkpoints/plots")
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help=f"total epochs, counting resumed ones (default: {defaults.epochs})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"images per step (default: {defaults.batch_size})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of the initial weights, the shuffling and the flips (default: {defaults.seed})",
    )
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help=f"auto, cpu or cuda (default: {DEFAULT_DEVICE})"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --save (last.pt) up to --epochs",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again even though --save already holds a run",
    )
    parser.add_argument(
        "--init",
        default=defaults.init,
        choices=INITS,
        help="random, or classifier: the rows of the backbone's own pretrained ImageNet "
        "classifier for the dataset's wnids (features of its default --node and "
        "torchvision's ImageNet weights), measured as epoch 0; fc8 is AlexNet's name "
        f"for it (default: {defaults.init})",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="per image and epoch, use the plain or the flipped features at "
        "random (needs features extracted with --flip)",
    )
    parser.add_argument(
        "--precision",
        default=defaults.precision,
        choices=HEAD_CHOICES,
        help="fp32, or bf16: the matmuls of training in bfloat16 (the weights, "
        "Adam and validation stay float32); about twice as fast on a CPU with "
        "AVX-512 bf16 units (default: fp32, exact)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read the features from the file in shuffled blocks instead of "
        "loading them (chosen by itself when they do not fit)",
    )
    parser.add_argument(
        "--max-memory",
        type=size,
        default=None,
        metavar="SIZE",
        help="memory the features may take, such as 2GB or 500MB; beyond it "
        "they are streamed (default: the memory available)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def size(text: str) -> int:
    try:
        return features.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = dict(vars(args))
    result = fit(
        given.pop("features"),
        given.pop("save"),
        device=given.pop("device"),
        stream=True if given.pop("stream") else None,
        max_memory=given.pop("max_memory"),
        log=note,
        progress=not given.pop("no_progress"),
        **given,
    )
    print(
        f"best.pt: epoch {result.best_epoch}, {result.best_by} selection, "
        f"top-1 {result.best_top1:.2f}%; saved in {result.save}"
    )
    return 0


def note(line: str) -> None:
    """Memory estimate on stdout; notes (what was not done as asked) and warnings on stderr."""
    print(line, file=sys.stderr if line.startswith(("note:", "warning:")) else sys.stdout)


if __name__ == "__main__":
    run_cli(main)
