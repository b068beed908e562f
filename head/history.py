"""The training history as a table and as pictures: history.csv, loss.png, accuracy.png, time.png.

Both are rewritten from the checkpoint's per-epoch lists (`Checkpoint.history`), so they always
agree with `last.pt`. The pictures are drawn on a bare matplotlib `Figure`, never through
pyplot, so no display and no backend choice are needed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

from extract.atomic import atomic_write

CSV = "history.csv"
PLOTS = ("loss.png", "accuracy.png", "time.png")


def cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return str(value)


def write_csv(history: dict[str, list], path: Path) -> None:
    """One row per epoch, a column per list of `Checkpoint.history`, named as there; empty cells
    where there is no val split. Written atomically."""
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(history)
        for row in zip(*history.values()):
            writer.writerow(cell(value) for value in row)


def plot(
    path: Path, epochs: list[int], series: dict[str, list[float]], ylabel: str, bars: bool = False
) -> None:
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for label, values in series.items():
        if all(math.isnan(value) for value in values):
            continue
        if bars:
            axes.bar(epochs, values, label=label)
        else:
            axes.plot(epochs, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def write_plots(history: dict[str, list], folder: Path) -> None:
    epochs = history["epoch"]
    plot(
        folder / "loss.png",
        epochs,
        {"train": history["train_loss"], "val": history["val_loss"]},
        "cross-entropy",
    )
    plot(
        folder / "accuracy.png",
        epochs,
        {
            "train top-1": history["train_top1"],
            "val top-1": history["val_top1"],
            "val top-5": history["val_top5"],
        },
        "accuracy (%)",
    )
    plot(folder / "time.png", epochs, {"epoch": history["seconds"]}, "seconds", bars=True)
