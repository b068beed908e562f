"""The zero-training probes and the per-head Adam: speed and memory against the plain way.

- ridge: `head.ridge.fit_ridge` over 20 l2 values (one pass, one eigendecomposition, one product)
  against scikit-learn's `RidgeClassifier` fitted once per value (one fit timed, times 20).
- knn: `head.knn.classify` for k in 10, 20, 100, 200 from one search, against scikit-learn's
  `KNeighborsClassifier` (brute force, cosine, the same exp(sim / 0.07) weights) run per k on a
  subset of the queries and scaled to all of them; their predictions are compared on that subset.
- adam: one step of 40 heads of 200 x 4096 as one wide layer, against 40 single-head steps.

Each stage's time is printed before the table (where the time goes), and peak resident memory is
measured per stage (Linux: the peak is reset through /proc/self/clear_refs). The tables are
appended to RESULTS.md.

Examples:
    python -m benchmarks.probes                                  # 100k x 4096, 10k val, all three
    python -m benchmarks.probes --rows 20000 --plain-queries 200 # a quick trial
    python -m benchmarks.probes --parts adam
    python -m benchmarks.probes --features /tmp/probes.h5 --parts ridge,knn  # reuse the file
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report

CLASSES = 200
VAL_ROWS = 10_000
KS = [10, 20, 100, 200]
NONE = lambda line: None  # noqa: E731


def reset_peak() -> None:
    """Start a new resident-memory peak (VmHWM) for the next stage."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def bench_ridge(data, plain_rows: int) -> list[list]:
    from sklearn.linear_model import RidgeClassifier

    from head import ridge

    reset_peak()
    started = time.perf_counter()
    stats = ridge.moments(data.train, data.num_classes)
    covariance_seconds = time.perf_counter() - started
    fit = ridge.solve(stats, None, standardize=False)
    seconds = time.perf_counter() - started
    peak = report.peak_rss_mb()
    import scipy.linalg

    eigh_started = time.perf_counter()
    scipy.linalg.eigh(stats.covariance, driver="evd")
    eigh_seconds = time.perf_counter() - eigh_started
    val = data.val.features.float()
    scored = time.perf_counter()
    accuracies = [
        top1(torch.addmm(fit.biases[i], val, fit.weights[i].T), data.val.labels)
        for i in range(len(fit.l2))
    ]
    best = int(np.argmax(accuracies))
    best_logits = torch.addmm(fit.biases[best], val, fit.weights[best].T)
    temperature = ridge.fit_temperature(best_logits, data.val.labels)
    scoring_seconds = time.perf_counter() - scored
    print(
        f"ridge: covariance pass {covariance_seconds:.1f} s, eigendecomposition "
        f"{eigh_seconds:.1f} s (timed again alone), solve in all {seconds - covariance_seconds:.1f}"
        f" s; scoring 20 layers on val and fitting T {scoring_seconds:.1f} s"
    )
    del stats, val
    reset_peak()
    rows = data.train.features[:plain_rows].float().numpy()
    labels = data.train.labels[:plain_rows].numpy()
    started = time.perf_counter()
    plain = RidgeClassifier(alpha=fit.l2[best]).fit(rows, labels)
    plain_one = time.perf_counter() - started
    plain_peak = report.peak_rss_mb()
    plain_top1 = (
        100.0 * (plain.predict(data.val.features.float().numpy()) == data.val.labels.numpy()).mean()
    )
    plain_seconds = plain_one * len(fit.l2) * len(data.train) / plain_rows
    rows_note = "" if plain_rows == len(data.train) else f" ({plain_rows} rows, scaled)"
    return [
        [
            "ours: one pass, one eigh, 20 products",
            seconds,
            1.0,
            len(data.train) * len(fit.l2) / seconds,
            f"{accuracies[best]:.1f} (l2 {fit.l2[best]:.3g}, T {temperature:.3g})",
            peak,
        ],
        [
            f"scikit-learn RidgeClassifier x 20 (1 timed{rows_note})",
            plain_seconds,
            plain_seconds / seconds,
            len(data.train) * len(fit.l2) / plain_seconds,
            f"{plain_top1:.1f}" if plain_rows == len(data.train) else "-",
            plain_peak,
        ],
    ]


def bench_knn(data, plain_queries: int) -> list[list]:
    from sklearn.neighbors import KNeighborsClassifier

    from head import knn
    from head.features import SplitTensors

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        rows = 2 * knn.TRAIN_ROWS
        part = SplitTensors("train", data.train.features[:rows], data.train.labels[:rows])
        knn.classify(part, data.val, KS, data.num_classes)
    print("k-NN profile, 2 train blocks against every query:")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))

    reset_peak()
    started = time.perf_counter()
    results = knn.classify(data.train, data.val, KS, data.num_classes)
    seconds = time.perf_counter() - started
    peak = report.peak_rss_mb()
    bound = knn.memory_bytes(len(data.val), data.num_classes, data.feature_dim, KS) / 2**20

    reset_peak()
    train = data.train.features.float().numpy()
    queries = data.val.features[:plain_queries].float().numpy()
    agree = []
    started = time.perf_counter()
    for k in KS:
        plain = KNeighborsClassifier(
            n_neighbors=k,
            algorithm="brute",
            metric="cosine",
            weights=lambda distances: np.exp((1.0 - distances) / knn.TEMPERATURE),
        ).fit(train, data.train.labels.numpy())
        predicted = plain.predict(queries)
        agree.append((predicted == results[k].predictions[:plain_queries].numpy()).mean())
    plain_seconds = (time.perf_counter() - started) * len(data.val) / plain_queries
    plain_peak = report.peak_rss_mb()
    print(
        f"k-NN: ours and scikit-learn give the same class on {min(agree):.1%} of "
        f"{plain_queries} rows (the lowest over the k values)"
    )
    accuracy = ", ".join(f"k={k} {results[k].top1:.1f}" for k in KS)
    return [
        [
            "ours: one top-200 search, in blocks",
            seconds,
            1.0,
            len(data.val) / seconds,
            accuracy,
            peak,
            f"{bound:,.0f}",
        ],
        [
            f"scikit-learn KNeighborsClassifier per k ({plain_queries} queries, scaled)",
            plain_seconds,
            plain_seconds / seconds,
            len(data.val) / plain_seconds,
            f"agrees on {min(agree):.1%}",
            plain_peak,
            "-",
        ],
    ]


def bench_adam(heads: int, classes: int, dim: int, steps: int) -> list[list]:
    from head.adam import Adam, grid_memory_bytes
    from head.grid import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS

    def timed(step) -> float:
        step()  # warm-up
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return min(times)  # the fastest: on a shared CPU the others measure the neighbours

    generator = torch.Generator().manual_seed(0)
    # The sweep's default grid, standardize innermost: 40 heads, 20 (lr, wd) pairs, 20 calls.
    grid = [(lr, wd) for lr in DEFAULT_LRS for wd in DEFAULT_WEIGHT_DECAYS for _ in ("off", "on")]
    grid = (grid * (heads // len(grid) + 1))[:heads]
    lrs, decays = [lr for lr, _ in grid], [wd for _, wd in grid]
    reset_peak()
    weight = torch.randn(heads * classes, dim, generator=generator).requires_grad_()
    bias = torch.randn(heads * classes, generator=generator).requires_grad_()
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    wide = Adam([weight, bias], lr=lrs, weight_decay=decays)
    wide_seconds = timed(wide.step)
    wide_peak = report.peak_rss_mb()
    del weight, bias, wide
    reset_peak()
    singles = []
    for lr, decay in zip(lrs, decays):
        weight = torch.randn(classes, dim, generator=generator).requires_grad_()
        bias = torch.randn(classes, generator=generator).requires_grad_()
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        singles.append(Adam([weight, bias], lr=lr, weight_decay=decay))
    single_seconds = timed(lambda: [optimizer.step() for optimizer in singles])
    single_peak = report.peak_rss_mb()
    touched = 7 * heads * classes * (dim + 1) * 4  # read 4 tensors, write 3, float32
    print(
        f"adam: {grid_memory_bytes(heads, classes, dim) / 2**20:,.0f} MiB of weights, gradients "
        f"and moments; a step reads and writes {touched / 1e9:.2f} GB"
    )
    return [
        [
            f"ours: one wide layer, {len(set(grid))} (lr, wd) pairs",
            wide_seconds * 1e3,
            1.0,
            touched / wide_seconds / 1e9,
            wide_peak,
        ],
        [
            f"{heads} single-head Adam steps",
            single_seconds * 1e3,
            single_seconds / wide_seconds,
            touched / single_seconds / 1e9,
            single_peak,
        ],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="train rows")
    parser.add_argument("--parts", default="ridge,knn,adam", help="comma-separated")
    parser.add_argument(
        "--plain-rows", type=int, help="rows scikit-learn's ridge is fitted on (default: all)"
    )
    parser.add_argument(
        "--plain-queries", type=int, default=500, help="queries scikit-learn's k-NN classifies"
    )
    parser.add_argument("--heads", type=int, default=40, help="adam: heads in the wide layer")
    parser.add_argument("--steps", type=int, default=20, help="adam: steps timed (fastest)")
    parser.add_argument(
        "--features", type=Path, help="reuse (or create) the synthetic feature file here"
    )
    parser.add_argument(
        "--notes", default="", help='said under each table, e.g. "A busy CPU (load 5 to 8)."'
    )
    args = parser.parse_args()
    parts = args.parts.split(",")

    if "ridge" in parts or "knn" in parts:
        from head import features

        path = args.features or Path(tempfile.mkdtemp(prefix="bench-probes-")) / "features.h5"
        if not path.is_file():
            from benchmarks import synthetic

            started = time.perf_counter()
            synthetic.write_features(path, args.rows, CLASSES, val_rows=VAL_ROWS)
            print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
        data = features.load(path, report=NONE, stream=False)
        shape = f"{len(data.train)} x {data.feature_dim} float16 train rows, {len(data.val)} val"
    if "ridge" in parts:
        report.publish(
            f"ridge probe: {shape}, {data.num_classes} classes, 20 l2 values",
            ["method", "seconds", "x ours", "rows x values / s", "val top-1 %", "peak RSS MB"],
            bench_ridge(data, args.plain_rows or len(data.train)),
            f"{args.notes} Peak RSS includes the features in memory.".strip(),
        )
    if "knn" in parts:
        report.publish(
            f"k-NN: {shape}, k in {','.join(map(str, KS))}",
            [
                "method",
                "seconds",
                "x ours",
                "queries / s",
                "val top-1 %",
                "peak RSS MB",
                "bound MB",
            ],
            bench_knn(data, args.plain_queries),
            f"{args.notes} Peak RSS includes the features in memory; 'bound' is "
            f"knn.memory_bytes, what the search may add to them.".strip(),
        )
    if "adam" in parts:
        report.publish(
            f"Adam step: {args.heads} heads of {CLASSES} x 4096, float32",
            ["method", "ms / step", "x ours", "GB/s moved", "peak RSS MB"],
            bench_adam(args.heads, CLASSES, 4096, args.steps),
            f"{args.notes} The fastest of {args.steps} steps.".strip(),
        )


if __name__ == "__main__":
    main()
