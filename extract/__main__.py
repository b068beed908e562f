"""python -m extract: cache a frozen network's features of a dataset in one HDF5 file.

Examples:
    python -m extract --data tiny-imagenet-200 --out features.h5   # AlexNet fc7
    python -m extract --data train=photos/train --data val=photos/val --out features.h5
    python -m extract --data labels.csv --out features.h5   # path,label[,split] columns
    python -m extract --data 'train=shards/train-{00000..00127}.tar' \
        --data 'val=shards/val-{00000..00007}.tar' --out features.h5 --classes classes.txt
    python -m extract --data 'train=hf/data/train-*.parquet' \
        --data 'val=hf/data/validation-*.parquet' --out features.h5 --image-column img
    python -m extract --data tiny-imagenet-200 --out resnet50.h5 --backbone resnet50
    python -m extract --data tiny-imagenet-200 --out vit.h5 --backbone vit_b_16 \\
        --weights IMAGENET1K_SWAG_LINEAR_V1
    python -m extract --data tiny-imagenet-200 --out mid.h5 --backbone resnet18 --node layer3
    python -m extract --backbone resnet18 --list-nodes
    python -m extract --list-backbones
    python -m extract --data tiny-imagenet-200 --out features.h5 --splits train,val,test --flip
    python -m extract --data tiny-imagenet-200 --out features.h5 --precision bf16 --device cuda
    python -m extract --data tiny-imagenet-200 --out features.h5 --resume   # after a crash
    python -m extract --data my_images --out features.h5 --weights alexnet_state_dict.pth
    python -m extract --data my_images --out features.h5 --backbone resnet18 --weights random
    torchrun --nproc-per-node 8 -m extract --data imagenet --out features.h5   # 8 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from extract import backbone, distributed
from extract.api import run
from extract.errors import UserError, run_cli
from extract.images import DECODERS
from extract.precisions import EXTRACT_CHOICES
from extract.runner import Options
from extract.sources import parse_data

# Defaults live in the options dataclass; argparse reads them from there.
DEFAULTS = Options(data=Path(), out=Path())


@dataclasses.dataclass
class Listing:
    """--list-backbones or --list-nodes: what to print instead of extracting."""

    backbone: str
    nodes: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace | Listing:
    parser = argparse.ArgumentParser(
        prog="python -m extract",
        description="Run a frozen torchvision network (by default pretrained AlexNet up to fc7: "
        "4096-d, after the second fully connected layer and its ReLU, eval mode) over a Tiny "
        "ImageNet or ImageFolder dataset, a CSV manifest, WebDataset tar shards or Parquet "
        "files, and cache features, labels, source ids, classes and provenance in one HDF5 "
        "file. The preprocessing is that of the weights' own transforms.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        action="append",
        help="a dataset folder, or SPLIT=SOURCE for each split (repeatable; required): "
        "SOURCE is an ImageFolder tree, a .csv/.tsv manifest (path and label columns, "
        "optionally split), .tar shards (a {00000..00127} range, a glob or a .txt list) or "
        ".parquet files (a file, glob or folder); docs/inputs.md. Read only",
    )
    parser.add_argument("--out", type=Path, help="HDF5 file to write (required)")
    parser.add_argument(
        "--backbone",
        default=backbone.DEFAULT_BACKBONE,
        help="any torchvision classification network: alexnet, resnet50, efficientnet_b0, "
        "vit_b_16, convnext_tiny, ... (--list-backbones; default: alexnet)",
    )
    parser.add_argument(
        "--node",
        default=None,
        help="graph node whose output is cached, averaged over space or tokens to a vector "
        "(--list-nodes; default: the input of the network's last Linear, its ImageNet "
        "classifier: fc7 for AlexNet, the pooled vector for ResNet, the class token for ViT)",
    )
    parser.add_argument(
        "--list-nodes", action="store_true", help="print the --backbone's nodes and exit"
    )
    parser.add_argument(
        "--list-backbones", action="store_true", help="print the --backbone names and exit"
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits (default: train,val where present; test also accepted)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (the architecture's DEFAULT torchvision weights), one of its weights "
        "names such as IMAGENET1K_V2, random (seeded) or a path to a state_dict file of "
        "the architecture (default: imagenet)",
    )
    parser.add_argument(
        "--classes",
        type=Path,
        default=DEFAULTS.classes,
        help="class file: one class a line, optionally TAB and a readable name (default: the "
        "sorted labels of the train split; a folder's own classes for a bare --data FOLDER)",
    )
    parser.add_argument(
        "--image-column",
        default=DEFAULTS.image_column,
        help=f"Parquet column of the image bytes (default: {DEFAULTS.image_column})",
    )
    parser.add_argument(
        "--label-column",
        default=DEFAULTS.label_column,
        help=f"Parquet or CSV column of the labels (default: {DEFAULTS.label_column})",
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
    if args.list_backbones or args.list_nodes:
        return Listing(args.backbone, nodes=args.list_nodes)
    if args.data is None or args.out is None:
        parser.error("--data and --out are required")
    args.data = parse_data(args.data)
    return args


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as `extract.run`'s keyword options."""
    given = dict(vars(args))
    for key in ("data", "out", "list_backbones", "list_nodes"):
        del given[key]
    given["progress"] = not given.pop("no_progress")
    return given


def print_listing(listing: Listing) -> None:
    if not listing.nodes:
        print("\n".join(backbone.architectures()))
        return
    # The graph does not depend on the weights: random ones need no file and no download.
    network = backbone.load_network(listing.backbone, backbone.RANDOM)
    try:
        default = backbone.default_node(network, listing.backbone)
    except UserError:
        default = None
    for node in backbone.node_names(network):
        print(f"{node}  (default)" if node == default else node)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, Listing):
        print_listing(args)
        return 0
    summary = run(args.data, args.out, **options(args))
    if not distributed.launched() or int(os.environ["RANK"]) == 0:
        stream = sys.stderr if summary.already_complete else sys.stdout
        print(summary.line(args.out), file=stream)
    return 0


if __name__ == "__main__":
    run_cli(main)
