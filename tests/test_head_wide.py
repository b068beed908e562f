"""head.wide: K heads as one wide layer step, export and score as K single heads do.

The reference is the ordinary run's own code, one head at a time: `step.train_step` with a
single-head Adam, `Run.exported` and `scoring.split_scores`. CPU; fp32 within 1e-5 relative
(1e-6 absolute), bf16 within 1e-3 relative; counts of hits exactly. The features are stored as
float16, as an extraction with `--precision fp16` stores them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import synthetic
from extract import store
from head import wide
from head.adam import Adam
from head.features import SplitTensors, StreamedSplit
from head.grid import Cell
from head.scoring import split_scores
from head.step import train_step
from head.training import Run

CLASSES, DIM = 7, 16  # over 5 classes, so that top-5 is not every row
# Two settings, on raw features and on standardised ones: the grid's order, raw heads first.
SETTINGS = [(1e-2, 0.0), (3e-3, 1e-2)]
CELLS = [Cell(lr, decay, standardize) for standardize in (False, True) for lr, decay in SETTINGS]


def rows(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of unequal mean and scale per dimension (so that standardising matters)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 4.0, DIM)
    features = (torch.randn(count, DIM, generator=generator) * scale + scale).relu()
    return features.half(), torch.randint(0, CLASSES, (count,), generator=generator)


def starts(cells: list[Cell]) -> tuple[wide.WideLayer, list[Run]]:
    """A wide layer of `cells` and, for each cell, the single-head run it must follow."""
    torch.manual_seed(0)
    raw, standardized = nn.Linear(DIM, CLASSES), nn.Linear(DIM, CLASSES)
    features = rows(200, seed=1)[0].float()
    mean, std = features.mean(0), features.std(0)
    layer = wide.new_layer(cells, raw, standardized, mean, std)
    runs = []
    for cell in cells:
        head = nn.Linear(DIM, CLASSES)
        head.load_state_dict((standardized if cell.standardize else raw).state_dict())
        optimizer = Adam([head.weight, head.bias], lr=cell.lr, weight_decay=cell.weight_decay)
        scaled = (mean, std) if cell.standardize else (None, None)
        runs.append(Run(head, optimizer, torch.Generator(), *scaled))
    return layer, runs


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.norm(value - reference) / torch.linalg.norm(reference)).item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_every_head_of_a_wide_step_follows_its_own_single_head_step(bf16):
    tolerance = 1e-3 if bf16 else 1e-5
    layer, runs = starts(CELLS)
    heads = len(CELLS)
    features, labels = rows(37, seed=2)
    for _ in range(3):  # three epochs over the same rows
        loss_sums = torch.zeros(heads, dtype=torch.float64)
        correct = torch.zeros(heads, dtype=torch.int64)
        sums = [
            (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)) for _ in runs
        ]
        for start in range(0, len(labels), 8):  # four batches of 8 and a short one of 5
            batch = features[start : start + 8], labels[start : start + 8]
            wide.train_step(layer, *batch, bf16, loss_sums, correct)
            for run, (loss_sum, hits) in zip(runs, sums):
                train_step(run, *batch, bf16, loss_sum, hits)
        assert correct.tolist() == [hits.item() for _, hits in sums]
        expected = torch.stack([loss_sum for loss_sum, _ in sums])
        torch.testing.assert_close(loss_sums, expected, rtol=tolerance, atol=0)
    for head, run in enumerate(runs):
        own = slice(head * CLASSES, (head + 1) * CLASSES)
        assert relative_error(layer.weight[own], run.head.weight) < tolerance
        assert relative_error(layer.bias[own], run.head.bias) < tolerance
    # Negative control: every head moved from its start, and differently from the others.
    fresh, _ = starts(CELLS)
    for head in range(heads):
        own = slice(head * CLASSES, (head + 1) * CLASSES)
        assert relative_error(layer.weight[own], fresh.weight[own]) > 100 * tolerance
        for other, run in enumerate(runs):
            if other != head:
                assert relative_error(layer.weight[own], run.head.weight) > 100 * tolerance


@pytest.mark.parametrize(
    "cells",
    [CELLS, CELLS[:2], CELLS[2:]],
    ids=["raw and standardised", "raw only", "standardised only"],
)
def test_exported_heads_are_the_layers_their_single_runs_save(cells):
    layer, runs = starts(cells)
    features, labels = rows(16, seed=3)
    for run in runs:  # one step, so that the heads differ from their starts
        zero = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        train_step(run, features, labels, False, *zero)
    layer.weight.copy_(torch.cat([run.head.weight.detach() for run in runs]))
    layer.bias.copy_(torch.cat([run.head.bias.detach() for run in runs]))
    weight, bias = wide.exported(layer)
    assert weight.shape == (len(cells) * CLASSES, DIM) and bias.shape == (len(cells) * CLASSES,)
    for head, run in enumerate(runs):
        own = slice(head * CLASSES, (head + 1) * CLASSES)
        expected = run.exported()
        torch.testing.assert_close(weight[own], expected["weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias[own], expected["bias"], rtol=1e-5, atol=1e-6)
    if layer.mean is not None and any(cell.standardize for cell in cells):
        # Negative control: a standardised head's trained weights are not its exported ones.
        head = next(index for index, cell in enumerate(cells) if cell.standardize)
        own = slice(head * CLASSES, (head + 1) * CLASSES)
        assert relative_error(layer.weight[own], weight[own]) > 1e-2


@pytest.mark.parametrize("streamed", [False, True], ids=["in memory", "streamed"])
def test_split_scores_are_each_heads_scores_over_every_chunk(streamed, tmp_path):
    """1500 val rows: in memory, a full chunk of `wide.EVAL_ROWS` and a short one; streamed,
    three blocks of 500 read from the file."""
    path = synthetic.write_features(
        tmp_path / "f.h5", 64, CLASSES, val_rows=1500, block=100, dim=DIM
    )
    with store.open_complete(path) as file:
        stored = store.read_split(file, "val")
    in_memory = SplitTensors(
        "val", torch.from_numpy(stored.features), torch.from_numpy(stored.labels).long()
    )
    split = StreamedSplit(path, "val", in_memory.labels, block_rows=500, buffer_blocks=1)
    torch.manual_seed(4)
    heads = 3
    weight, bias = torch.randn(heads * CLASSES, DIM) * 0.3, torch.randn(heads * CLASSES)
    measured = wide.split_scores(
        weight, bias, CLASSES, split if streamed else in_memory, torch.device("cpu")
    )
    for head in range(heads):
        own = slice(head * CLASSES, (head + 1) * CLASSES)
        expected = split_scores({"weight": weight[own], "bias": bias[own]}, in_memory, "cpu")
        assert measured.loss[head].item() == pytest.approx(expected.loss, rel=1e-5)
        assert measured.top1[head].item() == pytest.approx(expected.top1, rel=1e-12)
        assert measured.top5[head].item() == pytest.approx(expected.top5, rel=1e-12)
        # Negative control: the scores tell the heads apart and top-5 is not every row.
        assert expected.top1 < expected.top5 < 100.0
    assert len(set(measured.top1.tolist())) == heads
