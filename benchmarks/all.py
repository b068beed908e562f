"""Every benchmark in one go, sized for the machine: each prints its table and appends it to
benchmarks/RESULTS.md.

Presets:
    cpu   (about 20 minutes on a 2-core CPU) 2,000 images, head on 100k x 4096 features
    h100  (a few minutes on one H100, 16 cores) Tiny ImageNet's size: 100,000 training and
          10,000 validation images, batch 512, 16 workers

Examples:
    python -m benchmarks.all --preset cpu
    python -m benchmarks.all --preset h100 --data /tmp/bench-tiny
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report, synthetic

PRESETS = {
    "cpu": {
        "images": 2000,
        "val_images": 400,
        "device": "cpu",
        "extract": ["--batch-size", "128", "--precisions", "auto,bf16"],
        "head": ["--rows", "100000", "--epochs", "50", "--variants", "plain,ours,ours:bf16"],
        "pipeline": ["--epochs", "50", "--seed-epochs", "1"],
        "live": [],
    },
    "h100": {
        "images": 100_000,
        "val_images": 10_000,
        "device": "cuda",
        "extract": ["--batch-size", "512", "--workers", "16", "--precisions", "auto,bf16"],
        "head": ["--rows", "100000", "--epochs", "50", "--variants", "plain,ours,ours:bf16"],
        "pipeline": [
            "--epochs",
            "50",
            "--seed-epochs",
            "1",
            "--batch-size",
            "100",
            "--workers",
            "16",
        ],
        "live": [],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", type=Path, help="where to write (or reuse) the images")
    parser.add_argument("--only", help="comma-separated subset of extract,head,pipeline,live")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    data = args.data or Path(tempfile.mkdtemp(prefix="bench-all-")) / "data"
    if not (data / "wnids.txt").is_file():
        started = time.perf_counter()
        synthetic.write_images(data, preset["images"], 200, preset["val_images"])
        print(
            f"wrote {preset['images'] + preset['val_images']} images to {data} in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    chosen = args.only.split(",") if args.only else ["extract", "head", "pipeline", "live"]
    for name in chosen:
        extra = ["--data", str(data)] if name in ("extract", "pipeline") else []
        command = [
            sys.executable,
            "-m",
            f"benchmarks.{name}",
            *extra,
            "--device",
            preset["device"],
            *preset[name],
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=report.REPO, check=True)


if __name__ == "__main__":
    main()
