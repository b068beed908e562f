"""Every benchmark in one go, sized for the machine: each prints its table and appends it to
benchmarks/RESULTS.md.

Presets:
    cpu   (about 20 minutes on a 2-core CPU) 2,000 images, head on 100k x 4096 features
    h100  (sized for 8 minutes on one H100 or H200 with 16 cores, data included; not yet timed
          on one) Tiny ImageNet's size: 100,000 training and 10,000 validation images, batch
          512, a worker per core; 10,000 photo-sized files decoded in workers and on the GPU;
          the host path alone; the end-to-end extract on the same files as tar shards (not
          yet run on a GPU); live.serve under 8 WebSocket clients

A step that fails is reported and the others still run; the exit status is then 1.

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

# Each step: (name, module, arguments); "{data}" is the 64x64 image folder, "{photos}" a
# folder of photo-sized images next to it (written by the step itself when missing).
PRESETS = {
    "cpu": {
        "images": 2000,
        "val_images": 400,
        "device": "cpu",
        "steps": [
            ("host", "host", ["--images", "2000", "--photos", "300"]),
            ("extract", "extract", ["--data", "{data}", "--batch-size", "128"]),
            (
                "extract-photos",
                "extract",
                ["--data", "{photos}", "--photos", "--images", "300", "--precisions", "auto"],
            ),
            (
                "head",
                "head",
                ["--rows", "100000", "--epochs", "50", "--variants", "plain,ours,ours:bf16"],
            ),
            ("pipeline", "pipeline", ["--data", "{data}", "--epochs", "50", "--seed-epochs", "1"]),
            ("live", "live", []),
        ],
    },
    "h100": {
        "images": 100_000,
        "val_images": 10_000,
        "device": "cuda",
        # The GPU targets first; the seed's pipeline, the longest, last.
        "steps": [
            (
                "extract",
                "extract",
                ["--data", "{data}", "--batch-size", "512", "--precisions", "auto,bf16"],
            ),
            (
                "head",
                "head",
                ["--rows", "100000", "--epochs", "50", "--variants", "plain,ours,ours:bf16"],
            ),
            ("live", "live", []),
            ("serve", "live", ["--serve"]),
            # The ridge and k-NN probes' targets are the CPU's (benchmarks.probes runs them).
            ("sweep", "sweep", ["--rows", "100000", "--epochs", "10", "--no-probes"]),
            ("host", "host", ["--images", "5000", "--photos", "500"]),
            (
                "extract-shards",
                "extract",
                [
                    "--data",
                    "{data}",
                    "--batch-size",
                    "512",
                    "--precisions",
                    "auto",
                    "--sources",
                    "files,shards",
                ],
            ),
            (
                "extract-photos",
                "extract",
                [
                    "--data",
                    "{photos}",
                    "--photos",
                    "--images",
                    "10000",
                    "--batch-size",
                    "256",
                    "--precisions",
                    "auto",
                    "--decodes",
                    "workers,device",
                ],
            ),
            (
                "pipeline",
                "pipeline",
                ["--data", "{data}", "--epochs", "50", "--seed-epochs", "1", "--batch-size", "100"],
            ),
        ],
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
    parser.add_argument(
        "--only",
        help="comma-separated subset of host,extract,extract-photos,extract-shards,head,sweep,"
        "pipeline,live,serve",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    data = args.data or Path(tempfile.mkdtemp(prefix="bench-all-")) / "data"
    started = time.perf_counter()
    if not (data / "wnids.txt").is_file():
        synthetic.write_images(data, preset["images"], 200, preset["val_images"])
        print(
            f"wrote {preset['images'] + preset['val_images']} images to {data} in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    steps = preset["steps"]
    chosen = args.only.split(",") if args.only else [name for name, _, _ in steps]
    failed = []
    for name, module, arguments in steps:
        if name not in chosen:
            continue
        filled = [
            a.format(data=data, photos=data.with_name(data.name + "-photos")) for a in arguments
        ]
        command = [sys.executable, "-m", f"benchmarks.{module}", *filled]
        command += ["--device", preset["device"]]
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=report.REPO).returncode != 0:
            failed.append(name)
    print(
        f"all benchmarks done in {time.perf_counter() - started:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
