"""Teaching a class on the spot (`live.teaching`) against nearest class mean and a full retrain.

For each pair of left-out classes: `head.train` (the demo's recipe: 10 epochs, --standardize)
on the other classes gives the trained head and its replay set; `examples` train images of each
left-out class, drawn with `seed`, are then taught. Side by side, on the val split:

* taught (live): `live.teaching.Lessons` on that checkpoint's head and replay set, as
  ``Predictor.teach`` refits it;
* taught, no replay: the same for a checkpoint without a replay set (older ones);
* nearest class mean: the mean of every train row of each old class and of the taught examples,
  Euclidean distance;
* head.train rerun: the whole head trained again with the taught examples added.

"taught top-1" is over the val images of the left-out classes, "others" over the val images of
the other classes, before (the trained head) and after. Seconds: the refit, the means, or the
training run. Random backbone weights make every number low; the comparison is the point.

Examples:
    W=$(python -m extract.demo --out build/demo/data) && \\
        python -m extract --data build/demo/data --out build/demo/features.h5 --weights $W
    python -m benchmarks.teach --features build/demo/features.h5
    python -m benchmarks.teach --features build/demo/features.h5 --pairs 0,1 2,3 --examples 5
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from head import features as feature_sets
from head.checkpoint import Checkpoint
from head.features import FeatureSet, SplitTensors
from head.training import Settings, train
from live.teaching import Lessons

METHODS = ("taught (live)", "taught, no replay", "nearest class mean", "head.train rerun")
DEMO_RECIPE = Settings(epochs=10, standardize=True, progress=False)


@dataclasses.dataclass
class Outcome:
    """One method on one pair of left-out classes; top-1 in percent."""

    taught: float
    others_before: float
    others_after: float
    seconds: float


def top1(weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor):
    return 100.0 * float(((rows @ weight.T + bias).argmax(1) == labels).float().mean())


def subset(split: SplitTensors, classes: list[int]) -> SplitTensors:
    """The rows of `classes`, relabelled 0..len(classes)-1 in that order, as float32."""
    relabel = torch.full((int(split.labels.max()) + 1,), -1)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    keep = relabel[split.labels] >= 0
    return SplitTensors(split.name, split.features[keep].float(), relabel[split.labels[keep]])


def trained(
    data: FeatureSet, classes: list[int], train_split: SplitTensors, save: Path
) -> Checkpoint:
    """head.train's checkpoint (the last epoch's, with its replay set) on these rows."""
    chosen = dataclasses.replace(
        data,
        wnids=[data.wnids[c] for c in classes],
        names=[data.names[c] for c in classes],
        train=train_split,
        val=subset(data.val, classes),
    )
    return train(chosen, save, DEMO_RECIPE, torch.device("cpu"), report=lambda line: None)


@dataclasses.dataclass
class LeftOut:
    """One pair left out: the old classes' train rows, the taught examples, the val rows; labels
    are the old classes' 0..n_old-1, then the left-out ones."""

    n_old: int
    old_train: SplitTensors
    taught_rows: torch.Tensor
    taught_labels: torch.Tensor
    val: SplitTensors


def left_out(data: FeatureSet, pair: tuple[int, int], examples: int, seed: int) -> LeftOut:
    """The rows for teaching `pair`: `examples` train rows of each, drawn with `seed`."""
    old = [c for c in range(data.num_classes) if c not in pair]
    train_rows = subset(data.train, old + list(pair))
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in range(len(old), len(old) + len(pair)):
        members = torch.nonzero(train_rows.labels == label).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:examples]])
    picked = torch.cat(picked)
    is_old = train_rows.labels < len(old)
    return LeftOut(
        n_old=len(old),
        old_train=SplitTensors("train", train_rows.features[is_old], train_rows.labels[is_old]),
        taught_rows=train_rows.features[picked],
        taught_labels=train_rows.labels[picked],
        val=subset(data.val, old + list(pair)),
    )


def teach_pair(
    data: FeatureSet, pair: tuple[int, int], examples: int, seed: int
) -> dict[str, Outcome]:
    """Every method of METHODS on one pair of left-out classes."""
    old = [c for c in range(data.num_classes) if c not in pair]
    order = old + list(pair)
    rows = left_out(data, pair, examples, seed)
    old_train, taught_rows, taught_labels = rows.old_train, rows.taught_rows, rows.taught_labels
    val_rows = rows.val
    old_val, new_val = val_rows.labels < len(old), val_rows.labels >= len(old)

    def outcome(weight, bias, seconds) -> Outcome:
        return Outcome(
            taught=top1(weight, bias, val_rows.features[new_val], val_rows.labels[new_val]),
            others_before=before,
            others_after=top1(weight, bias, val_rows.features[old_val], val_rows.labels[old_val]),
            seconds=seconds,
        )

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        state = trained(data, old, old_train, Path(folder) / "old")
        weight, bias = state.weight, state.bias
        before = top1(weight, bias, val_rows.features[old_val], val_rows.labels[old_val])
        replay = state.replay_rows()
        for method, (replay_features, replay_labels) in (
            ("taught (live)", replay),
            ("taught, no replay", (replay[0][:0], replay[1][:0])),
        ):
            lessons = Lessons(
                weight=weight,
                bias=bias,
                wnids=[str(c) for c in old],
                names=[str(c) for c in old],
                provenance={},
                replay_features=replay_features,
                replay_labels=replay_labels,
            )
            for label in range(len(old), len(order)):
                examples_of = taught_rows[taught_labels == label]
                lessons.add(
                    f"new {label}", examples_of, torch.zeros(len(examples_of), 0, dtype=torch.uint8)
                )
            started = time.perf_counter()
            results[method] = outcome(*lessons.head(), time.perf_counter() - started)

        started = time.perf_counter()
        means = torch.stack(
            [old_train.features[old_train.labels == c].mean(0) for c in range(len(old))]
            + [taught_rows[taught_labels == c].mean(0) for c in range(len(old), len(order))]
        )
        # Nearest mean as a linear layer: argmin |x - m|^2 = argmax (2 m.x - |m|^2).
        ncm = (2 * means, -(means * means).sum(1))
        results["nearest class mean"] = outcome(*ncm, time.perf_counter() - started)

        started = time.perf_counter()
        rerun = trained(
            data,
            order,
            SplitTensors(
                "train",
                torch.cat([old_train.features, taught_rows]),
                torch.cat([old_train.labels, taught_labels]),
            ),
            Path(folder) / "rerun",
        )
        results["head.train rerun"] = outcome(
            rerun.weight,
            rerun.bias,
            time.perf_counter() - started,
        )
    return results


def compare(
    features: Path, pairs: list[tuple[int, int]], examples: int = 10, seed: int = 0
) -> dict[str, list[Outcome]]:
    """Method -> its outcome on each pair."""
    data = feature_sets.load(features, report=lambda line: None, stream=False)
    if data.val is None:
        raise SystemExit(f"{features}: no val split to measure on")
    outcomes = {method: [] for method in METHODS}
    for pair in pairs:
        for method, outcome in teach_pair(data, pair, examples, seed).items():
            outcomes[method].append(outcome)
    return outcomes


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pair(text: str) -> tuple[int, int]:
    first, second = (int(part) for part in text.split(","))
    return first, second


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.teach",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--features", type=Path, required=True, help="a feature file with val")
    parser.add_argument(
        "--pairs",
        type=pair,
        nargs="+",
        default=[(0, 1), (2, 3), (4, 5), (6, 7)],
        help="the left-out class pairs (default: 0,1 2,3 4,5 6,7)",
    )
    parser.add_argument("--examples", type=int, default=10, help="taught per class (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="which examples (default 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    outcomes = compare(args.features, args.pairs, args.examples, args.seed)
    rows = []
    for method, results in outcomes.items():
        taught = [result.taught for result in results]
        rows.append(
            [
                method,
                mean(taught),
                " / ".join(f"{value:.0f}" for value in taught),
                mean(r.others_before for r in results),
                mean(r.others_after for r in results),
                mean(r.others_after - r.others_before for r in results),
                mean(r.seconds for r in results),
            ]
        )
    report.publish(
        f"teach: {len(args.pairs)} pairs of left-out classes, {args.examples} examples each, "
        f"{args.features.name}, cpu",
        [
            "method",
            "taught top-1 %",
            "per pair",
            "others before %",
            "others after %",
            "change",
            "seconds",
        ],
        rows,
        notes=f"Pairs {' '.join(f'{a},{b}' for a, b in args.pairs)}; val split; one thread; "
        f"the CPU was busy with other work.",
    )


if __name__ == "__main__":
    main()
