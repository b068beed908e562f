"""Sweep speed: `head.sweep`'s 40 heads at once against 40 separate `head.train` runs, same file.

Three of the 40 cells are trained alone (`head.fit`, in a fresh process each) and their
training time scaled to 40; the sweep trains the whole default grid in one process. Both count
the epochs (train and val passes), not the file's loading. The streamed sweep reports the bytes
read from the file per epoch (from /proc/self/io, between two epoch lines): one pass over the
train and val features for all heads. The features are `synthetic.write_features(hard=True)`:
a weak signal under badly scaled dimensions, so the grid's best and worst cells differ. Then
`benchmarks.probes` times the ridge probe and k-NN on the same file (`--no-probes` skips it).

Examples:
    python -m benchmarks.head --sweep                        # 100k x 4096, 40 heads, 10 epochs
    python -m benchmarks.sweep --rows 20000 --epochs 2       # a quick trial
    python -m benchmarks.sweep --profile                     # where a wide step's time goes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report, synthetic
from benchmarks.head import features_bytes

CLASSES = 200
VAL_ROWS = 10_000
MB = 2**20
# The cells timed alone: the slowest and fastest corners and one standardised cell in between.
ALONE = [(1e-4, 0.0, False), (1e-3, 1e-4, True), (1e-2, 1e-3, True)]


def bytes_read() -> int:
    """Bytes this process has read through system calls (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def sweep_variant(features: Path, save: Path, epochs: int, device: str, stream: bool) -> dict:
    import head

    marks = []

    def log(line: str) -> None:
        if line.startswith("epoch "):
            marks.append(bytes_read())

    started = time.perf_counter()
    rows = head.sweep(
        features,
        save,
        epochs=epochs,
        device=device,
        stream=True if stream else None,
        max_memory="500MB" if stream else None,
        progress=False,
        overwrite=True,
        log=log,
    )
    finished = time.perf_counter()
    from head import checkpoint, sweeping

    state = checkpoint.load_dict(save / sweeping.STATE, "sweep state")
    adam = [row for row in rows if row["method"] == "adam"]
    top1 = [row["val_top1"] for row in adam]
    return {
        "seconds": sum(state["heads"][0]["history"]["seconds"]),
        "total_seconds": finished - started,
        "heads": len(adam),
        "best_top1": max(top1),
        "worst_top1": min(top1),
        "epoch_bytes": [after - before for before, after in zip(marks, marks[1:])],
    }


def alone_variant(features: Path, save: Path, epochs: int, device: str, cell: int) -> dict:
    import head

    lr, decay, standardize = ALONE[cell]
    result = head.fit(
        features,
        save,
        lr=lr,
        weight_decay=decay,
        standardize=standardize,
        epochs=epochs,
        device=device,
        progress=False,
        overwrite=True,
    )
    return {"seconds": sum(result.history["seconds"]), "best_top1": result.best_top1}


def profile(rows: int, steps: int) -> None:
    """Where a step of the default grid's 40 heads goes (torch.profiler, CPU), random features."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    from head import grid, wide

    cells = grid.cells(grid.DEFAULT_LRS, grid.DEFAULT_WEIGHT_DECAYS, "both")
    dim = synthetic.FEATURE_DIM
    start = torch.nn.Linear(dim, CLASSES)
    layer = wide.new_layer(cells, start, start, torch.zeros(dim), torch.ones(dim))
    features = torch.rand(rows, dim).half()
    labels = torch.randint(0, CLASSES, (rows,))
    sums = torch.zeros(len(cells), dtype=torch.float64)
    hits = torch.zeros(len(cells), dtype=torch.int64)
    batches = [(features[i : i + 100], labels[i : i + 100]) for i in range(0, rows, 100)]
    wide.train_step(layer, *batches[0], False, sums, hits)
    with profiled(activities=[ProfilerActivity.CPU]) as trace:
        for index in range(steps):
            wide.train_step(layer, *batches[index % len(batches)], False, sums, hits)
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="train rows")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--stream-epochs", type=int, default=2, help="epochs of the streamed run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--features", type=Path, help="reuse (or create) the feature file here")
    parser.add_argument(
        "--profile", action="store_true", help="profile 20 steps of the default 40-head grid"
    )
    parser.add_argument(
        "--no-probes", action="store_true", help="skip benchmarks.probes' ridge and k-NN tables"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        profile(2000, 20)
        return
    if args.variant:
        kind, _, detail = args.variant.partition(":")
        if kind == "alone":
            result = alone_variant(args.features, args.save, args.epochs, args.device, int(detail))
        else:
            result = sweep_variant(
                args.features, args.save, args.epochs, args.device, detail == "stream"
            )
        result.update(peak_rss_mb=report.peak_rss_mb(), peak_gpu_mb=report.peak_gpu_mb())
        print(json.dumps(result))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    features = args.features or scratch / "features.h5"
    if not features.is_file():
        synthetic.write_features(features, args.rows, CLASSES, val_rows=VAL_ROWS, hard=True)
    common = ["--features", str(features), "--device", args.device]

    def run(variant: str, epochs: int) -> dict:
        save = scratch / variant.replace(":", "-")
        extra = ["--epochs", str(epochs), "--variant", variant, "--save", str(save)]
        result = report.run_variant("benchmarks.sweep", [*common, *extra])
        print(variant, json.dumps(result), flush=True)
        return result

    alone = [run(f"alone:{cell}", args.epochs) for cell in range(len(ALONE))]
    swept = run("sweep", args.epochs)
    streamed = run("sweep:stream", args.stream_epochs)
    heads = swept["heads"]
    one = sum(result["seconds"] for result in alone) / len(alone)
    stored_bytes = features_bytes(features)
    per_epoch = streamed["epoch_bytes"]
    rows = [
        [
            f"{len(alone)} head.train runs, scaled to {heads}",
            one * heads,
            one * heads / args.epochs,
            1.0,
            max(result["peak_rss_mb"] for result in alone),
            "-",
        ],
        [
            f"head.sweep, {heads} heads at once",
            swept["seconds"],
            swept["seconds"] / args.epochs,
            swept["seconds"] / (one * heads),
            swept["peak_rss_mb"],
            f"{swept['worst_top1']:.1f} to {swept['best_top1']:.1f}",
        ],
        [
            f"head.sweep streamed ({args.stream_epochs} epochs, 500MB)",
            streamed["seconds"],
            streamed["seconds"] / args.stream_epochs,
            "-",
            streamed["peak_rss_mb"],
            f"{streamed['worst_top1']:.1f} to {streamed['best_top1']:.1f}",
        ],
    ]
    read = ", ".join(f"{value / MB:,.0f} MB" for value in per_epoch) or "-"
    report.publish(
        f"head.sweep: {args.rows} x {synthetic.FEATURE_DIM} float16 hard synthetic train rows "
        f"(+{VAL_ROWS} val), {CLASSES} classes, {args.epochs} epochs, batch 100, {args.device}",
        ["training", "train s", "s/epoch", "x separate", "peak RSS MB", "val top-1 % range"],
        rows,
        f"One head alone: {one:,.1f} s for {args.epochs} epochs (mean of {len(alone)} cells: "
        + ", ".join(f"{result['seconds']:,.1f} s" for result in alone)
        + f"). Streamed: bytes read per epoch after the first {read}, against "
        f"{stored_bytes / MB:,.0f} MB of train and val features: one pass for "
        f"all heads.",
    )
    if not args.no_probes:
        command = [sys.executable, "-m", "benchmarks.probes", "--parts", "ridge,knn"]
        command += ["--rows", str(args.rows), "--features", str(features)]
        subprocess.run(command, cwd=report.REPO, check=True)


if __name__ == "__main__":
    main()
