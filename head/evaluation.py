"""A trained head measured on one split of a feature file: what `head.report` computes.

Top-1, top-5, mean per-class accuracy and expected calibration error (15 equal-width confidence
bins), and, when asked, per_class.csv, confusion.png and report.json. The metrics are
scikit-learn's; only the ECE, which scikit-learn does not offer for many classes, is computed here.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from extract import store
from extract.errors import UserError
from head import checkpoint
from head.model import head_from_layer
from head.scoring import predict

ECE_BINS = 15
LABELLED_AXES_UP_TO = 30  # classes; beyond this the confusion matrix has no tick labels


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Sum over confidence bins of |accuracy - confidence|, weighted by the bin's share."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def metrics(probabilities: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, top-5, mean per-class accuracy (percent) and ECE of class probabilities.

    `predicted` is the argmax of the logits: softmax can round two close logits to one value.
    """
    classes = np.arange(probabilities.shape[1])
    k = min(5, len(classes))
    if k < len(classes):
        top5 = top_k_accuracy_score(labels, probabilities, k=k, labels=classes)
    else:
        top5 = 1.0  # every class is among the top k
    with warnings.catch_warnings():
        # Classes predicted but absent from this split are not an error for a per-class mean.
        warnings.simplefilter("ignore")
        mean_per_class = balanced_accuracy_score(labels, predicted)
    return {
        "images": int(len(labels)),
        "top1": 100.0 * accuracy_score(labels, predicted),
        "top5": 100.0 * top5,
        "mean_per_class_accuracy": 100.0 * mean_per_class,
        "expected_calibration_error": expected_calibration_error(probabilities, labels),
        "k": k,
    }


def write_per_class(
    path: Path, labels: np.ndarray, predicted: np.ndarray, wnids: list[str], names: list[str]
) -> None:
    classes = np.arange(len(wnids))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["label", "wnid", "name", "images", "accuracy", "precision"])
        for label in classes:
            accuracy = f"{100 * recall[label]:.2f}" if support[label] else ""
            writer.writerow(
                [
                    label,
                    wnids[label],
                    names[label],
                    support[label],
                    accuracy,
                    f"{100 * precision[label]:.2f}",
                ]
            )


def plot_confusion(
    path: Path,
    labels: np.ndarray,
    predicted: np.ndarray,
    wnids: list[str],
    names: list[str],
    title: str,
) -> None:
    """Row-normalised confusion matrix: row = true class, column = predicted class."""
    matrix = confusion_matrix(labels, predicted, labels=np.arange(len(wnids)))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = 6 if len(wnids) <= LABELLED_AXES_UP_TO else 10
    figure = Figure(figsize=(size, size), dpi=100)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(wnids) <= LABELLED_AXES_UP_TO:
        ticks = np.arange(len(wnids))
        axes.set_xticks(ticks, names, rotation=90, fontsize=7)
        axes.set_yticks(ticks, names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    figure.tight_layout()
    figure.savefig(path)


def evaluate(model: Path, features_path: Path, split: str, out: Path | None = None) -> dict:
    """Measure the checkpoint on `split`; with `out`, write the three report files into it.

    Returns what report.json holds: the metrics, the model and feature files, the split, the
    checkpoint's epoch and best accuracy, and how many unlabelled images were left out.
    """
    state = checkpoint.load(model)
    model_file = model / checkpoint.BEST if model.is_dir() else model
    with store.open_complete(features_path) as file:
        classes = store.read_classes(file)
        feature_dim = store.feature_dim(file)
        checkpoint.check_compatible(
            state,
            str(model_file),
            features_path,
            store.provenance(file),
            classes.wnids,
            feature_dim,
        )
        arrays = store.read_split(file, split)
    head = head_from_layer(state.weight, state.bias, str(model_file), feature_dim)
    wnids = state.wnids
    labelled = arrays.labels >= 0
    if not labelled.any():
        raise UserError(f"{features_path}: the {split} split has no labels to evaluate against")
    features = torch.from_numpy(arrays.features[labelled])
    labels = arrays.labels[labelled]
    logits = predict({"weight": head.weight, "bias": head.bias}, features)
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    predicted = logits.argmax(dim=1).numpy()
    result = metrics(probabilities, predicted, labels)
    report = {
        "model": str(model_file),
        "features": str(features_path),
        "split": split,
        "epoch": state.epoch,
        "best_accuracy": state.best_top1,
        **result,
        "unlabelled_skipped": int((~labelled).sum()),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_per_class(out / "per_class.csv", labels, predicted, wnids, classes.names)
        plot_confusion(
            out / "confusion.png",
            labels,
            predicted,
            wnids,
            classes.names,
            f"{split}: top-1 {result['top1']:.1f}%",
        )
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
