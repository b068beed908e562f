"""Head training speed and memory: ours (`python -m head.train`) against the plain loop, same file.

The plain loop is what users write: the features read from the HDF5 file as one float32 tensor,
per epoch a `randperm`, each batch indexed from the tensor, `nn.Linear`, `CrossEntropyLoss`,
Adam at lr 1e-3, and a validation pass per epoch (ours measures val every epoch too). Each side
runs in a fresh process, so its peak resident memory is its own. The memory target is
1.3 x the bytes of the features trained on (as stored: float16) + 500 MB.

Examples:
    python -m benchmarks.head                                   # 100k rows, 50 epochs, batch 100
    python -m benchmarks.head --rows 20000 --epochs 3           # a quick trial
    python -m benchmarks.head --device cuda
    python -m benchmarks.head --rows 20000 --epochs 3 --variants plain,ours,ours:stream
    python -m benchmarks.head --variants plain,ours,ours:bf16     # bf16 matmuls
    python -m benchmarks.head --device cuda --variants ours,ours:eager  # CUDA graphs or not
    python -m benchmarks.head --sweep     # head.sweep's 40 heads against 40 runs, benchmarks.sweep
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import report

CLASSES = 200
MB = 2**20
VAL_ROWS = 10_000


def plain(features_path: Path, epochs: int, batch_size: int, device: str) -> dict:
    from extract import store

    with store.open_complete(features_path) as file:
        arrays = {split: store.read_split(file, split) for split in ("train", "val")}
    train = torch.from_numpy(arrays["train"].features).float().to(device)
    train_labels = torch.from_numpy(arrays["train"].labels).to(device)
    val = torch.from_numpy(arrays["val"].features).float().to(device)
    val_labels = torch.from_numpy(arrays["val"].labels).to(device)
    torch.manual_seed(0)
    model = nn.Linear(train.shape[1], CLASSES).to(device)
    loss_function = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train), device=device)
        for start in range(0, len(train), batch_size):
            rows = order[start : start + batch_size]
            loss = loss_function(model(train[rows]), train_labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            correct = (model(val).argmax(1) == val_labels).sum().item()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "val_top1": 100.0 * correct / len(val)}


def ours(
    features_path: Path, epochs: int, batch_size: int, device: str, save: Path, options: list[str]
) -> dict:
    """`options`: "stream" (from the file, 500 MB of features in memory), "bf16", and "eager"
    (on CUDA, the steps launched one by one instead of replayed from CUDA graphs)."""
    from head import features
    from head.training import Settings, train

    started = time.perf_counter()
    stream = "stream" in options
    settings = Settings(
        epochs=epochs,
        batch_size=batch_size,
        progress=False,
        overwrite=True,
        precision="bf16" if "bf16" in options else "fp32",
        cuda_graphs="eager" not in options,
    )
    torch_device = torch.device(device)
    data = features.load(
        features_path,
        device=torch_device,
        report=lambda line: None,
        stream=True if stream else None,
        max_memory=features.parse_size("500MB") if stream else None,
    )
    loaded = time.perf_counter()
    state = train(data, save, settings, torch_device, report=lambda line: None)
    finished = time.perf_counter()
    # Training as the plain loop counts it (no file reading), with our checkpoints and plots.
    return {
        "seconds": finished - loaded,
        "total_seconds": finished - started,
        "load_seconds": loaded - started,
        "val_top1": state.history["val_top1"][-1],
    }


def variant_main(args) -> None:
    """One side of the comparison, in its own process; prints a JSON line."""
    if args.variant == "plain":
        result = plain(args.features, args.epochs, args.batch_size, args.device)
    else:
        result = ours(
            args.features,
            args.epochs,
            args.batch_size,
            args.device,
            args.save,
            args.variant.split(":")[1:],
        )
    result.update(peak_rss_mb=report.peak_rss_mb(), peak_gpu_mb=report.peak_gpu_mb())
    print(json.dumps(result))


def features_bytes(path: Path) -> int:
    """Bytes of the train and val features as stored (what training holds in memory)."""
    from extract import store

    with store.open_complete(path) as file:
        infos = [store.split_info(file, split) for split in ("train", "val")]
    return sum(math.prod(info.shape) * info.dtype.itemsize for info in infos)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="train rows")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        default="plain,ours",
        help="plain, ours (in memory), ours:stream, ours:bf16, ours:eager (no CUDA graphs), "
        "combined as ours:stream:bf16; comma-separated",
    )
    parser.add_argument(
        "--features", type=Path, help="reuse (or create) the synthetic feature file here"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run benchmarks.sweep instead (its own defaults; --rows, --device and --features "
        "are passed on)",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        from benchmarks import sweep

        passed = ["--rows", str(args.rows), "--device", args.device]
        sweep.main(passed + (["--features", str(args.features)] if args.features else []))
        return
    if args.variant:
        variant_main(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-head-"))
    features_path = args.features or scratch / "features.h5"
    if not features_path.is_file():
        # Imported here: the data generator pulls in torchvision, which the measured
        # processes (like head.train itself) never load.
        from benchmarks import synthetic

        synthetic.write_features(features_path, args.rows, CLASSES, val_rows=VAL_ROWS)
    size = features_bytes(features_path)
    budget_mb = (1.3 * size + 500 * MB) / MB
    common = [
        "--features",
        str(features_path),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
    ]
    results = {
        variant: report.run_variant(
            "benchmarks.head", [*common, "--variant", variant, "--save", str(scratch / variant)]
        )
        for variant in args.variants.split(",")
    }
    baseline = results.get("plain")
    rows = []
    for variant, result in results.items():
        per_epoch = result["seconds"] / args.epochs
        ratio = result["seconds"] / baseline["seconds"] if baseline else float("nan")
        rows.append(
            [
                variant,
                per_epoch,
                result["seconds"],
                result.get("total_seconds", result["seconds"]),
                ratio,
                result["val_top1"],
                result["peak_rss_mb"],
                f"{result['peak_rss_mb'] / budget_mb:.2f}",
                result["peak_gpu_mb"],
            ]
        )
    report.publish(
        f"head: {args.rows} x 4096 float16 train rows (+{VAL_ROWS} val), {CLASSES} classes, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.device}",
        [
            "training",
            "s/epoch",
            "train s",
            "total s",
            "x plain",
            "val top-1 %",
            "peak RSS MB",
            "RSS / budget",
            "peak GPU MB",
        ],
        rows,
        f"Features {size / MB:,.0f} MB as stored; RSS budget = 1.3 x that + 500 MB = "
        f"{budget_mb:,.0f} MB. 'train s' counts the epochs (train and val pass); 'total s' "
        f"adds reading the file, checkpoints and plots.",
    )


if __name__ == "__main__":
    main()
