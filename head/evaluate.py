"""python -m head.evaluate: measure a trained head on one split of a feature file.

Reports top-1, top-5, mean per-class accuracy and expected calibration error (15 equal-width
confidence bins), and writes per_class.csv, confusion.png and report.json
(`head.evaluation`; from Python: `head.report`).

Examples:
    python -m head.evaluate --model model --features features.h5
    python -m head.evaluate --model model/last.pt --features features.h5 --split train
    python -m head.evaluate --model model --features features.h5 --out reports/val
"""

from __future__ import annotations

import argparse
from pathlib import Path

from extract.errors import run_cli
from head.api import report, reports_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m head.evaluate",
        description="Top-1, top-5, mean per-class accuracy and expected calibration error of a "
        "trained head on one split; writes per_class.csv, confusion.png and report.json.",
        epilog=__doc__.split("Examples:\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="folder from head.train (uses best.pt) or a checkpoint file",
    )
    parser.add_argument("--features", type=Path, required=True, help="HDF5 file from extract")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the reports (default: the model folder)"
    )
    args = parser.parse_args(argv)
    out = args.out or reports_folder(args.model)
    measured = report(args.model, args.features, args.split, out)
    print(
        f"{measured['split']}: {measured['images']} images  top1 {measured['top1']:.2f}%  "
        f"top{measured['k']} {measured['top5']:.2f}%  "
        f"mean per-class {measured['mean_per_class_accuracy']:.2f}%  "
        f"ECE {measured['expected_calibration_error']:.4f}  -> {out}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
