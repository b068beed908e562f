"""Extraction speed: ours (`python -m extract`) against the plain torchvision way, same files.

The plain way is what users write: `ImageFolder` with the weights' own evaluation transforms
(`weights.transforms()` on PIL images), a `DataLoader`, the network cut at the same node by
`create_feature_extractor` (AlexNet: fc7) in fp32 under `no_grad`, features collected and saved
with `np.save`. Both sides use the same seeded random weights, so their features are compared.

Ours is timed as the user sees it (the call to the complete file), and also from the call to
its first batch on the device and, in steady state, from that batch to the last one written.

Examples:
    python -m benchmarks.extract --images 2000
    python -m benchmarks.extract --images 200 --backbone resnet50 --precisions auto
    python -m benchmarks.extract --images 110000 --data /tmp/bench-data --batch-size 512 \
        --workers 16 --precisions auto,bf16
    python -m benchmarks.extract --photos --images 20000 --precisions auto --decodes workers,device
    python -m benchmarks.extract --images 100000 --precisions auto --sources files,shards

With ``--sources files,shards`` ours also reads the same files as WebDataset tar shards of
1,000 samples (`benchmarks.synthetic.write_shards`), end to end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report, synthetic

SHARD_SAMPLES = 1000


def plain(
    data: Path, out: Path, batch_size: int, workers: int, device: str, name: str, node: str
) -> dict:
    from torchvision import datasets
    from torchvision.models import get_model, get_model_weights
    from torchvision.models.feature_extraction import create_feature_extractor

    started = time.perf_counter()
    transform = get_model_weights(name).DEFAULT.transforms()
    dataset = datasets.ImageFolder(data / "train", transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device == "cuda"
    )
    model = get_model(name, weights=None).eval()
    model = create_feature_extractor(model, return_nodes={node: "features"}).to(device)
    features = []
    with torch.no_grad():
        for images, _ in loader:
            features.append(model(images.to(device))["features"].cpu())
    np.save(out, torch.cat(features).numpy())
    seconds = time.perf_counter() - started
    paths = [Path(p).relative_to(data).as_posix() for p, _ in dataset.samples]
    return {"seconds": seconds, "images": len(dataset), "paths": paths}


def ours(
    data: Path,
    out: Path,
    batch_size: int,
    workers: int,
    device: str,
    precision: str,
    decode: str = "workers",
    source: str = "files",
    backbone: str = "alexnet",
) -> dict:
    from extract import runner

    shards = {"train": synthetic.shard_pattern(data)} if source == "shards" else None
    options = runner.Options(
        data=shards or data,
        out=out,
        splits=None if shards else ["train"],
        backbone=backbone,
        weights="random",
        device=device,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        decode=decode,
        overwrite=True,
        progress=False,
    )
    started = time.perf_counter()
    summary = runner.run(options)
    return {
        "seconds": time.perf_counter() - started,
        "images": summary.images,
        "first_batch_seconds": summary.first_batch_seconds,
        "steady_rate": summary.steady_rate,
    }


def variant_main(args) -> None:
    """One side of the comparison, in its own process; prints a JSON line."""
    node = default_node(args.backbone) if args.variant == "plain" else None
    torch.manual_seed(0)  # the seed of `--weights random`: both sides get the same weights
    if args.variant == "plain":
        result = plain(
            args.data,
            args.out,
            args.batch_size,
            args.workers,
            args.device,
            args.backbone,
            node,
        )
    else:
        result = ours(
            args.data,
            args.out,
            args.batch_size,
            args.workers,
            args.device,
            *args.variant.split(":")[1:],
            backbone=args.backbone,
        )
    result.update(peak_rss_mb=report.peak_rss_mb(), peak_gpu_mb=report.peak_gpu_mb())
    print(json.dumps(result))


def default_node(name: str) -> str:
    """The node ours reads by default: the input of the network's ImageNet classifier."""
    from torchvision.models import get_model

    from extract import backbone

    with torch.random.fork_rng(devices=[]):  # the seeded weights stay those of ours
        return backbone.default_node(get_model(name, weights=None), name)


def max_relative_difference(ours_file: Path, plain_file: Path, plain_paths: list[str]) -> float:
    from extract import store

    with store.open_complete(ours_file) as file:
        arrays = store.read_split(file, "train")
    reference = np.load(plain_file)
    # A shard's row is named "<shard>:<path without its suffix>"; a file's row by its path.
    order = {path.rsplit(".", 1)[0]: row for row, path in enumerate(plain_paths)}
    reference = reference[[order[p.split(".tar:")[-1].rsplit(".", 1)[0]] for p in arrays.paths]]
    ours_rows = arrays.features.astype(np.float32)
    norms = np.linalg.norm(reference, axis=1)
    return float((np.linalg.norm(ours_rows - reference, axis=1) / norms).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--data", type=Path, help="reuse (or create) the synthetic data here")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precisions", default="auto,bf16", help="our precisions to run (comma-separated)"
    )
    parser.add_argument(
        "--decodes", default="workers", help="where ours decodes JPEG files: workers,device"
    )
    parser.add_argument("--photos", action="store_true", help="photo-sized files, not 64x64")
    parser.add_argument(
        "--sources", default="files", help="what ours reads the files as: files,shards"
    )
    parser.add_argument(
        "--backbone", default="alexnet", help="torchvision network to compare (default: alexnet)"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers is None:
        from extract.runner import default_workers

        args.workers = default_workers(torch.device(args.device))
    if args.variant:
        variant_main(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    data = args.data or scratch / "data"
    if not (data / "wnids.txt").is_file():
        synthetic.write_images(data, args.images, args.classes, photos=args.photos)
    common = [
        "--data",
        str(data),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--device",
        args.device,
        "--backbone",
        args.backbone,
    ]
    plain_result = report.run_variant(
        "benchmarks.extract", [*common, "--variant", "plain", "--out", str(scratch / "p.npy")]
    )
    rate = plain_result["images"] / plain_result["seconds"]
    rows = [
        [
            "plain torchvision (fp32)",
            plain_result["images"],
            plain_result["seconds"],
            rate,
            1.0,
            "-",
            "-",
            plain_result["peak_rss_mb"],
            plain_result["peak_gpu_mb"],
            "-",
        ]
    ]
    if "shards" in args.sources and not synthetic.shard_folder(data).is_dir():
        synthetic.write_shards(data, synthetic.shard_folder(data), SHARD_SAMPLES)
    variants = [
        (p, d, s)
        for s in args.sources.split(",")
        for d in args.decodes.split(",")
        for p in args.precisions.split(",")
    ]
    for precision, decode, source in variants:
        out = scratch / f"ours-{precision}-{decode}-{source}.h5"
        result = report.run_variant(
            "benchmarks.extract",
            [*common, "--variant", f"ours:{precision}:{decode}:{source}", "--out", str(out)],
        )
        difference = max_relative_difference(out, scratch / "p.npy", plain_result["paths"])
        ours_rate = result["images"] / result["seconds"]
        rows.append(
            [
                f"ours --precision {precision}"
                + (f" --decode {decode}" if decode != "workers" else "")
                + (f", {source}" if source != "files" else ""),
                result["images"],
                result["seconds"],
                ours_rate,
                ours_rate / rate,
                result["first_batch_seconds"],
                result["steady_rate"],
                result["peak_rss_mb"],
                result["peak_gpu_mb"],
                f"{difference:.1e}",
            ]
        )
    sizes = "about 500x375 (4 sizes mixed)" if args.photos else "64x64"
    report.publish(
        f"extract {args.backbone}: {plain_result['images']} JPEG files {sizes}, "
        f"batch {args.batch_size}, "
        f"{args.workers} workers, {args.device}",
        [
            "pipeline",
            "images",
            "seconds",
            "images/s",
            "x plain",
            "first batch s",
            "steady images/s",
            "peak RSS MB",
            "peak GPU MB",
            "max rel. diff",
        ],
        rows,
        "End to end: JPEG files to features on disk (ours: complete HDF5 file, float16). "
        "'first batch s': from the call (imports excluded) to the first batch on the device; "
        "'steady images/s': from that batch to the last one written.",
    )


if __name__ == "__main__":
    main()
