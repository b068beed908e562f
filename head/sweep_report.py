"""The sweep's report: sweep.csv, sweep.png and the table the command prints.

One row per head and per baseline (k-NN, ridge), as dicts with the keys of `COLUMNS`; the row
that won ``best.pt`` has ``best`` True. The picture is drawn on a bare matplotlib `Figure`, as
`history` draws the training curves: no display, no backend choice.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

from extract.atomic import atomic_write
from head.history import cell

CSV = "sweep.csv"
PNG = "sweep.png"
COLUMNS = (
    "method",
    "lr",
    "weight_decay",
    "standardize",
    "best_epoch",
    "val_top1",
    "val_top5",
    "val_loss",
    "train_top1",
    "seconds",
    "best",
    "note",
)


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per head and baseline, in the grid's order; written atomically."""
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(csv_cell(row.get(column)) for column in COLUMNS)


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return cell(value)


def ranked(rows: list[dict]) -> list[dict]:
    """Best first: by val top-1, then by lower val loss; rows without a score last."""

    def key(row: dict) -> tuple:
        top1 = row.get("val_top1")
        loss = row.get("val_loss")
        missing = top1 is None or math.isnan(top1)
        return (
            missing,
            0.0 if missing else -top1,
            math.inf if loss is None or math.isnan(loss) else loss,
        )

    return sorted(rows, key=key)


def number(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(rows: list[dict], selection: str) -> str:
    """The rows sorted by val top-1 as aligned text; `selection` names the split scored."""
    header = (
        "method",
        "lr",
        "wd / l2",
        "std",
        "epoch",
        f"{selection} top1",
        "top5",
        "loss",
        "train top1",
        "s",
        "",
    )
    lines = [header]
    for row in ranked(rows):
        standardize = row.get("standardize")
        lines.append(
            (
                row["method"],
                number(row.get("lr"), "g"),
                number(row.get("weight_decay"), ".3g"),
                "-" if standardize is None else ("on" if standardize else "off"),
                number(row.get("best_epoch"), "d"),
                number(row.get("val_top1"), ".2f"),
                number(row.get("val_top5"), ".2f"),
                number(row.get("val_loss"), ".3f"),
                number(row.get("train_top1"), ".2f"),
                number(row.get("seconds"), ".1f"),
                " ".join(
                    part
                    for part in ("<- best.pt" if row.get("best") else "", row.get("note") or "")
                    if part
                ),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in lines
    )


def write_png(
    rows: list[dict], best_history: dict | None, path: Path, selection: str = "val"
) -> None:
    """Val top-1 as a learning-rate x weight-decay heatmap per standardize setting, the best
    cell circled, and the best head's curves beside them."""
    heads = [row for row in rows if row["method"] == "adam"]
    views = sorted({row["standardize"] for row in heads})
    lrs = sorted({row["lr"] for row in heads})
    decays = sorted({row["weight_decay"] for row in heads})
    panels = len(views) + (1 if best_history else 0)
    figure = Figure(figsize=(4.5 * max(panels, 1), 4), dpi=100, layout="constrained")
    axes_list = figure.subplots(1, max(panels, 1), squeeze=False)[0]
    finite = [row["val_top1"] for row in heads if not math.isnan(row["val_top1"])]
    low, high = (min(finite), max(finite)) if finite else (0.0, 100.0)
    image = None
    for axes, view in zip(axes_list, views):
        grid = [[math.nan] * len(lrs) for _ in decays]
        for row in heads:
            if row["standardize"] == view:
                grid[decays.index(row["weight_decay"])][lrs.index(row["lr"])] = row["val_top1"]
        image = axes.imshow(grid, origin="lower", cmap="viridis", vmin=low, vmax=high)
        for y, values in enumerate(grid):
            for x, value in enumerate(values):
                text = "NaN" if math.isnan(value) else f"{value:.1f}"
                axes.text(x, y, text, ha="center", va="center", fontsize=7, color="white")
        for row in heads:
            if row.get("best") and row["standardize"] == view:
                x, y = lrs.index(row["lr"]), decays.index(row["weight_decay"])
                axes.scatter([x], [y], s=600, facecolors="none", edgecolors="red", linewidths=2)
        axes.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
        axes.set_yticks(range(len(decays)), [f"{decay:g}" for decay in decays], fontsize=7)
        axes.set_xlabel("learning rate")
        axes.set_ylabel("weight decay")
        axes.set_title(f"{selection} top-1 %, standardize {'on' if view else 'off'}")
    if image is not None:
        figure.colorbar(image, ax=list(axes_list[: len(views)]), shrink=0.8)
    if best_history:
        axes = axes_list[-1]
        epochs = best_history["epoch"]
        for key, label in (
            ("train_top1", "train top-1"),
            ("val_top1", f"{selection} top-1"),
        ):
            values = best_history[key]
            if not all(math.isnan(value) for value in values):
                axes.plot(epochs, values, marker="o", markersize=3, label=label)
        axes.set_xlabel("epoch")
        axes.set_ylabel("accuracy (%)")
        axes.set_title("best head")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png")
