"""Live classification speed: ours (`python -m live --no-display`) against the plain way.

The plain way is what users write: a `cv2.VideoCapture` loop, BGR -> RGB, a PIL image,
torchvision's Resize(256) / CenterCrop(224) / ToTensor / Normalize, torchvision's AlexNet with
`classifier[6]` replaced by the head, fp32, batch 1, under `no_grad`, softmax per frame.

Both read the same synthetic 640x480 video (moving stripes, gradient and a disc, mp4v) with the
same model: a head checkpoint with random weights on the `--weights random` backbone. FPS is
frames over the loop's wall time (loading excluded); latency is from a frame read to its
probabilities known. Each variant runs in a fresh process. Ours reports its per-stage times too,
and every variant's top-1 per frame is compared with the plain way's.

With --serve it measures `python -m live.serve` instead: 8 WebSocket clients x 200 frames against
`live --no-display` on the same JPEG files (benchmarks/serve.py says what and how).

Examples:
    python -m benchmarks.live
    python -m benchmarks.live --serve
    python -m benchmarks.live --serve --clients 4 --frames 100
    python -m benchmarks.live --frames 300 --device cpu
    BENCHMARK_RESULTS=/tmp/trial.md python -m benchmarks.live --frames 150 --variants fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks import report, serve

WIDTH, HEIGHT, FPS = 640, 480, 30.0
CLASSES = 200
# Our variants: name -> extra command-line arguments of `python -m live`.
OURS = {
    "fp32": [],
    "fp32 --output": ["--output", "{scratch}/out.mp4"],
    "bf16": ["--precision", "bf16"],
    "fp32 --threads 1": ["--threads", "1"],
}


def write_video(path: Path, frames: int) -> Path:
    """A 640x480 mp4v video whose content moves: drifting stripes, a gradient, a moving disc."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    for index in range(frames):
        phase = index / 15.0
        stripes = 60 * np.sin((x * np.cos(phase) + y * np.sin(phase)) / 9.0 + index)
        cx, cy = WIDTH / 2 + 200 * np.cos(phase), HEIGHT / 2 + 150 * np.sin(1.3 * phase)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < 70**2) * 90.0
        base = np.stack(
            [x / WIDTH * 200, y / HEIGHT * 200, (index % 60) * 3.0 + np.zeros_like(x)], axis=-1
        )
        pixels = base + stripes[..., None] + disc[..., None] + rng.normal(0, 8, base.shape)
        writer.write(np.clip(pixels, 0, 255).astype(np.uint8))
    writer.release()
    return path


def write_model(folder: Path) -> Path:
    """A head checkpoint as head.train saves it, random head, `--weights random`."""
    from extract import backbone
    from head import checkpoint

    wnids = [f"n{label:08d}" for label in range(CLASSES)]
    frozen = backbone.build("alexnet", "random")
    head = torch.nn.Linear(frozen.feature_dim, CLASSES)
    trained = checkpoint.Checkpoint(
        weight=head.weight.detach(),
        bias=head.bias.detach(),
        wnids=wnids,
        class_names={w: f"class {i}" for i, w in enumerate(wnids)},
        provenance=frozen.provenance(),
        epoch=1,
    )
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save(trained, folder / checkpoint.BEST)
    return folder


def plain(video: Path, model_dir: Path, device: str) -> dict:
    from PIL import Image
    from torchvision import transforms

    from extract import backbone

    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    network = backbone.load_network("alexnet", "random")  # torchvision's alexnet(), seeded
    from head import checkpoint

    head = checkpoint.load(model_dir).layer
    network.classifier[6] = torch.nn.Linear(4096, CLASSES)
    network.classifier[6].load_state_dict(head)
    network = network.eval().to(device)
    capture = cv2.VideoCapture(str(video))
    latencies, top1 = [], []
    started = time.perf_counter()
    with torch.no_grad():
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            read = time.perf_counter()
            image = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            batch = transform(image).unsqueeze(0).to(device)
            probs = torch.softmax(network(batch), dim=1)[0].cpu()
            latencies.append((time.perf_counter() - read) * 1000.0)
            top1.append(int(probs.argmax()))
    seconds = time.perf_counter() - started
    capture.release()
    return {
        "frames": len(top1),
        "seconds": seconds,
        "latencies_ms": latencies,
        "top1": top1,
        "stage_ms": {},
    }


def ours(video: Path, model_dir: Path, device: str, extra: list[str], log: Path) -> dict:
    from live.__main__ import classify, parse_args

    args = parse_args(
        [
            "--model",
            str(model_dir),
            "--source",
            str(video),
            "--no-display",
            "--device",
            device,
            "--topk",
            "1",
            "--log",
            str(log),
            *extra,
        ]
    )
    summary = classify(args)
    top1 = [json.loads(line)["topk"][0]["index"] for line in log.read_text().splitlines()]
    return {
        "frames": summary.frames,
        "seconds": summary.seconds,
        "latencies_ms": summary.latencies_ms,
        "top1": top1,
        "stage_ms": summary.stage_ms,
    }


def variant_main(args) -> None:
    """One side of the comparison, in its own process; prints a JSON line."""
    if args.variant == "plain":
        result = plain(args.video, args.model, args.device)
    else:
        extra = [a.format(scratch=args.scratch) for a in OURS[args.variant]]
        result = ours(args.video, args.model, args.device, extra, args.scratch / "ours.jsonl")
    result.update(peak_rss_mb=report.peak_rss_mb())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--frames", type=int, help="frames of the video (300; 200 with --serve)")
    parser.add_argument("--serve", action="store_true", help="measure live.serve under load")
    parser.add_argument("--clients", type=int, default=8, help="with --serve: clients at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        default=",".join(OURS),
        help=f"our variants to run, comma-separated, of: {', '.join(OURS)}",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        variant_main(args)
        return
    if args.serve_process:
        serve.server_main(args.model, args.device)
        return
    args.frames = args.frames or (200 if args.serve else 300)

    scratch = Path(tempfile.mkdtemp(prefix="bench-live-"))
    video = write_video(scratch / "clip.mp4", args.frames)
    model_dir = write_model(scratch / "model")
    if args.serve:
        serve.main(scratch, video, model_dir, args.device, args.clients)
        return
    common = [
        "--video",
        str(video),
        "--model",
        str(model_dir),
        "--device",
        args.device,
        "--scratch",
        str(scratch),
    ]
    results = {"plain": report.run_variant("benchmarks.live", [*common, "--variant", "plain"])}
    for name in args.variants.split(","):
        results[name] = report.run_variant("benchmarks.live", [*common, "--variant", name])

    reference = results["plain"]
    plain_fps = reference["frames"] / reference["seconds"]
    rows, stage_rows = [], []
    stages = ("wait", "preprocess", "network", "log", "overlay", "video")
    for name, result in results.items():
        fps = result["frames"] / result["seconds"]
        p50, p95 = np.percentile(result["latencies_ms"], [50, 95])
        same = np.mean(np.equal(result["top1"], reference["top1"])) * 100
        label = "plain torchvision (fp32)" if name == "plain" else f"ours {name}"
        rows.append(
            [
                label,
                result["frames"],
                fps,
                float(p50),
                float(p95),
                fps / plain_fps,
                result["peak_rss_mb"],
                f"{same:.0f}%",
            ]
        )
        if name != "plain":
            stage_rows.append([label] + [result["stage_ms"].get(s, 0.0) for s in stages])
    title = f"live: {args.frames} frames {WIDTH}x{HEIGHT} mp4v, headless, batch 1, {args.device}"
    report.publish(
        title,
        [
            "pipeline",
            "frames",
            "FPS",
            "latency p50 ms",
            "latency p95 ms",
            "x plain",
            "peak RSS MB",
            "same top-1 as plain",
        ],
        rows,
        "Video file to probabilities per frame, model loading excluded; ours also "
        "writes a JSONL log line per frame. Random backbone and head weights, so "
        "top-1 agreement is a strict test (near-flat probabilities).",
    )
    report.publish(
        f"live per-stage ms per frame ({args.device})",
        ["pipeline", *stages],
        stage_rows,
        "Preprocessing runs in the read-ahead thread, overlapping the "
        "network; wait is the loop waiting for the next prepared frame.",
    )


if __name__ == "__main__":
    main()
