"""python -m head.sweep: train a grid of heads at once on cached features and keep the best.

Examples:
    python -m head.sweep --features features.h5 --save sweep      # 5 lr x 4 wd x std on/off
    python -m head.sweep --features features.h5 --save sweep --lr 1e-3,1e-2 --weight-decay 0
    python -m head.sweep --features features.h5 --save sweep --standardize on --epochs 20
    python -m head.sweep --features features.h5 --save sweep --holdout 0.1  # val stays unseen
    python -m head.sweep --features features.h5 --save sweep --knn 10,20,100,200 --ridge
    python -m head.sweep --features features.h5 --save sweep --resume --epochs 50
    python -m head.sweep --features features.h5 --save sweep --save-all   # every head's best.pt

Every head reads the same batches in the same order (one seeded generator) and ends with the
weights `python -m head.train` gives with its settings and --seed. best.pt is an ordinary
checkpoint for head.evaluate, head.report and live.
"""

from __future__ import annotations

import argparse

from extract.errors import run_cli
from head import api, grid
from head.train import add_training_arguments, note


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m head.sweep",
        description="Train a grid of linear heads (--lr x --weight-decay x --standardize) at "
        "once as one wide layer, on the features cached by `python -m extract`, and save the "
        "best by val top-1 (ties: lower val loss) as best.pt. Writes sweep.csv, sweep.png "
        "and sweep.pt (for --resume) and prints the heads sorted by val top-1.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    parser.add_argument(
        "--lr",
        default=",".join(f"{lr:g}" for lr in grid.DEFAULT_LRS),
        help="Adam learning rates, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-decay",
        default=",".join(f"{decay:g}" for decay in grid.DEFAULT_WEIGHT_DECAYS),
        help="Adam weight decays, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--standardize",
        default=grid.DEFAULT_STANDARDIZE,
        choices=tuple(grid.STANDARDIZE),
        help="heads on standardised features (on), on raw ones (off), or both "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="FRACTION",
        help="select on this seeded fraction of train, in (0, 0.5], instead of on val; the "
        "winner is then trained again on all of train (default: select on val)",
    )
    parser.add_argument(
        "--knn",
        default=None,
        metavar="K,K,...",
        help="also report weighted k-NN (cosine, temperature 0.07) for these k, such as "
        "10,20,100,200 (reported only, never saved as best.pt)",
    )
    parser.add_argument(
        "--ridge",
        action="store_true",
        help="also fit closed-form ridge heads over 20 l2 values (the best may win best.pt)",
    )
    parser.add_argument(
        "--save-all", action="store_true", help="also keep each head's best.pt under SAVE/heads/"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = dict(vars(args))
    rows = api.sweep(
        given.pop("features"),
        given.pop("save"),
        lr=given.pop("lr"),
        weight_decay=given.pop("weight_decay"),
        standardize=given.pop("standardize"),
        knn=given.pop("knn"),
        ridge=given.pop("ridge"),
        holdout=given.pop("holdout"),
        save_all=given.pop("save_all"),
        device=given.pop("device"),
        stream=True if given.pop("stream") else None,
        max_memory=given.pop("max_memory"),
        log=note,
        progress=not given.pop("no_progress"),
        **given,
    )
    from head import sweep_report

    selection = "holdout" if args.holdout is not None else "val"
    print(sweep_report.table(rows, selection))
    best = next(row for row in rows if row.get("best"))
    view = "on" if best["standardize"] else "off"
    chosen = (
        f"ridge l2 {best['weight_decay']:.3g} standardize {view}"
        if best["method"] == "ridge"
        else f"adam lr {best['lr']:g} weight decay {best['weight_decay']:g} standardize {view}, "
        f"epoch {best['best_epoch']}"
    )
    print(f"best.pt: {chosen}, {selection} top-1 {best['val_top1']:.2f}%; saved in {args.save}")
    return 0


if __name__ == "__main__":
    run_cli(main)
