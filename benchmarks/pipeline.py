"""The whole job: ours (extract once, then E epochs of the head on cached features) against the
seed's approach (E epochs of the full network, frozen backbone and new last layer, over the
images), on the same JPEG files.

The seed's epochs all cost the same, so by default its time is measured over
`--seed-epochs` epochs and scaled to E; pass `--seed-epochs E` to run them all.

Examples:
    python -m benchmarks.pipeline --images 2000 --val-images 400 --epochs 50
    python -m benchmarks.pipeline --images 100000 --val-images 10000 --epochs 50 --workers 16
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


def seed_epochs(data: Path, epochs: int, batch_size: int, workers: int, device: str) -> dict:
    """The classic loop: every epoch runs every image through the whole (frozen) AlexNet."""
    from torchvision import datasets, transforms
    from torchvision.models import alexnet

    from extract.dataset import read_classes, read_manifest

    torch.manual_seed(0)
    setup_started = time.perf_counter()
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    train = datasets.ImageFolder(data / "train", transform=transform)
    classes = read_classes(data)
    val_manifest = read_manifest(data, "val", classes)
    val = [(str(data / p), label) for p, label in zip(val_manifest.paths, val_manifest.labels)]
    val_set = datasets.ImageFolder(data / "train", transform=transform)
    val_set.samples = val_set.imgs = val
    model = alexnet(weights=None)
    model.classifier[6] = torch.nn.Linear(4096, len(train.classes))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("classifier.6")
    model = model.eval().to(device)
    optimizer = torch.optim.Adam(model.classifier[6].parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        train, batch_size=batch_size, shuffle=True, num_workers=workers
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers)
    setup = time.perf_counter() - setup_started
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for images, labels in val_loader:
                model(images.to(device)).argmax(1).eq(labels.to(device)).sum().item()
        times.append(time.perf_counter() - started)
    return {"setup": setup, "epoch_seconds": times, "images": len(train) + len(val)}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-m", *command], cwd=report.REPO, capture_output=True, text=True
    )
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=400)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data", type=Path, help="reuse (or create) the synthetic data here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers is None:
        from extract.runner import default_workers

        args.workers = default_workers(torch.device(args.device))
    if args.variant == "seed":
        result = seed_epochs(
            args.data, args.seed_epochs, args.batch_size, args.workers, args.device
        )
        print(json.dumps({**result, "peak_rss_mb": report.peak_rss_mb()}))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    data = args.data or scratch / "data"
    if not (data / "wnids.txt").is_file():
        synthetic.write_images(data, args.images, args.classes, args.val_images)
    features = scratch / "features.h5"
    extract_seconds = timed(
        [
            "extract",
            "--data",
            str(data),
            "--out",
            str(features),
            "--weights",
            "random",
            "--device",
            args.device,
            "--workers",
            str(args.workers),
            "--no-progress",
        ]
    )
    head_seconds = timed(
        [
            "head.train",
            "--features",
            str(features),
            "--save",
            str(scratch / "model"),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--no-progress",
        ]
    )
    seed = report.run_variant(
        "benchmarks.pipeline",
        [
            "--data",
            str(data),
            "--variant",
            "seed",
            "--seed-epochs",
            str(args.seed_epochs),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--device",
            args.device,
        ],
    )
    epoch = min(seed["epoch_seconds"])
    seed_total = seed["setup"] + epoch * args.epochs
    ours_total = extract_seconds + head_seconds
    scaled = (
        ""
        if args.seed_epochs >= args.epochs
        else f" (measured over {args.seed_epochs} epoch(s), fastest epoch x {args.epochs})"
    )
    report.publish(
        f"pipeline: {seed['images']} images, {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.device}",
        ["approach", "extract s", "per epoch s", "total s", "x faster"],
        [
            ["seed: every epoch through the frozen network", "-", epoch, seed_total, 1.0],
            [
                "ours: extract once + head on cached features",
                extract_seconds,
                head_seconds / args.epochs,
                ours_total,
                seed_total / ours_total,
            ],
        ],
        f"Ours is timed as two commands end to end (process start included); the seed's "
        f"total{scaled}.",
    )


if __name__ == "__main__":
    main()
