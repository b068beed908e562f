"""python -m live.export: the stitched model as a torch.export program, to serve without this repo.

Writes FILE.pt2 (``torch.export.save``; load it with ``torch.export.load``): normalized images
(N, 3, crop, crop) in, logits (N, C) out, any batch size, with the preprocessing parameters and
the class names inside it (extra file ``live.json``) and beside it (FILE.json). With the onnx and
onnxscript packages installed, FILE.onnx as well; with --torchscript, the deprecated TorchScript
file FILE.pt too. From Python: ``live.load(model).export(out)``.

Examples:
    python -m live.export --model build/demo/model --out build/demo/live.pt2
    python -m live.export --model build/demo/model --out live.pt2 --torchscript
    python -m live.export --imagenet --out alexnet_imagenet.pt2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from extract.errors import run_cli
from live import exporter
from live.predictor import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m live.export",
        description="Export backbone and head, stitched, as a torch.export program (.pt2), and "
        "as ONNX when onnx is installed, with preprocessing parameters and class names.",
        epilog=__doc__.split("Examples:\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="checkpoint file or head.train's folder")
    what.add_argument("--imagenet", action="store_true", help="the 1000-way ImageNet network")
    parser.add_argument("--out", type=Path, required=True, help="program file to write (.pt2)")
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights (default: those recorded in the checkpoint)",
    )
    parser.add_argument(
        "--torchscript",
        action="store_true",
        help="also write TorchScript (FILE.pt), which torch has deprecated",
    )
    args = parser.parse_args(argv)
    predictor = (
        load(None, device="cpu", weights=args.weights, imagenet=True)
        if args.imagenet
        else load(args.model, device="cpu", weights=args.weights)
    )
    written = predictor.export(args.out, torchscript=args.torchscript)
    print("wrote " + ", ".join(str(path) for path in written))
    if not exporter.onnx_available():
        print("onnx or onnxscript is not installed: no ONNX file (pip install onnx onnxscript)")
    return 0


if __name__ == "__main__":
    run_cli(main)
