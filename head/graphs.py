"""The training epoch replayed from CUDA graphs.

On CUDA, with the features in memory, the epoch's order is copied to the device once and the
steps are replayed from a CUDA graph (`EpochGraph`): a step is a dozen tiny kernels, and
launching them one by one from Python took longer than running them. The eager loop
(`head.training.train_epoch`) stays for the CPU, for streamed features, and as the reference the
graphed one is tested against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from head.features import SplitTensors, StreamedSplit
from head.scoring import Scores
from head.settings import Settings
from head.step import epoch_order, gather, train_step

if TYPE_CHECKING:
    from head.training import Run

MAX_STEPS_PER_GRAPH = 32  # steps captured in one CUDA graph (a divisor of the epoch's steps)


@dataclasses.dataclass
class ReplayCount:
    """The graph replays this process has run: how a test knows an epoch ran from a graph."""

    replays: int = 0


REPLAYED = ReplayCount()


@dataclasses.dataclass
class EpochGraph:
    """`steps` training steps captured in one CUDA graph, reading rows through a device-side
    offset into the epoch's order; replaying it walks through the epoch without the host."""

    graph: torch.cuda.CUDAGraph
    steps: int
    order: torch.Tensor  # (N,) int64 on the device, refilled each epoch
    flipped: torch.Tensor | None  # (N,) bool: which rows use the flipped view this epoch
    offset: torch.Tensor  # () int64: the first row of the next step in `order`
    loss_sum: torch.Tensor
    correct: torch.Tensor


def graphed_step(
    run: Run, train: SplitTensors, batch_size: int, bf16: bool, graph: EpochGraph
) -> None:
    """The captured step: the batch at `graph.offset` of the order, then the offset moved on."""
    positions = torch.arange(batch_size, device=graph.order.device) + graph.offset
    rows = graph.order.index_select(0, positions)
    use_flip = None if graph.flipped is None else graph.flipped.index_select(0, positions)
    features = gather(train.features, rows, train.features_flip, use_flip)
    labels = train.labels.index_select(0, rows)
    train_step(run, features, labels, bf16, graph.loss_sum, graph.correct)
    graph.offset.add_(batch_size)


def build_epoch_graph(run: Run, train: SplitTensors, settings: Settings) -> EpochGraph:
    """Capture the steps of one graph after warming them up on a side stream, as CUDA graphs
    require; the warm-up's changes to the head and to Adam are undone, so that capturing
    changes no result."""
    device = run.head.weight.device
    full_steps = len(train) // settings.batch_size
    steps = max(d for d in range(1, MAX_STEPS_PER_GRAPH + 1) if full_steps % d == 0)
    flip = settings.flip and train.features_flip is not None
    graph = EpochGraph(
        graph=torch.cuda.CUDAGraph(),
        steps=steps,
        order=torch.arange(len(train), device=device),
        flipped=torch.zeros(len(train), dtype=torch.bool, device=device) if flip else None,
        offset=torch.zeros((), dtype=torch.int64, device=device),
        loss_sum=torch.zeros((), dtype=torch.float64, device=device),
        correct=torch.zeros((), dtype=torch.int64, device=device),
    )
    bf16 = settings.precision == "bf16"
    adam = run.optimizer
    state = [run.head.weight, run.head.bias, *adam.exp_avgs, *adam.exp_avg_sqs, *adam.steps]
    saved = [tensor.detach().clone() for tensor in state]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            graphed_step(run, train, settings.batch_size, bf16, graph)
            graph.offset.zero_()  # the first batch again: an epoch may hold only one
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.no_grad():
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
    with torch.cuda.graph(graph.graph):
        for _ in range(steps):
            graphed_step(run, train, settings.batch_size, bf16, graph)
    return graph


def graphed_epoch(run: Run, train: SplitTensors, settings: Settings, bar: tqdm) -> Scores:
    """`train_epoch` for in-memory features on CUDA: the full batches replayed from the graph,
    the last, shorter one (if any) stepped eagerly from the same order."""
    if run.graph is None:
        run.graph = build_epoch_graph(run, train, settings)
    graph = run.graph
    order, flipped = epoch_order(len(train), run.generator, graph.flipped is not None)
    graph.order.copy_(order, non_blocking=True)
    if flipped is not None:
        graph.flipped.copy_(flipped, non_blocking=True)
    graph.offset.zero_()
    graph.loss_sum.zero_()
    graph.correct.zero_()
    full_steps = len(train) // settings.batch_size
    for _ in range(full_steps // graph.steps):
        graph.graph.replay()
        REPLAYED.replays += 1
        bar.update(graph.steps * settings.batch_size)
    done = full_steps * settings.batch_size
    if done < len(train):
        rows = graph.order[done:]
        use_flip = None if flipped is None else graph.flipped[done:]
        features = gather(train.features, rows, train.features_flip, use_flip)
        labels = train.labels.index_select(0, rows)
        bf16 = settings.precision == "bf16"
        train_step(run, features, labels, bf16, graph.loss_sum, graph.correct)
        bar.update(len(train) - done)
    return Scores(
        loss=graph.loss_sum.item() / len(train),
        top1=100.0 * graph.correct.item() / len(train),
        top5=math.nan,
    )


def uses_graphs(run: Run, train: SplitTensors | StreamedSplit, settings: Settings) -> bool:
    return (
        settings.cuda_graphs
        and run.head.weight.device.type == "cuda"
        and isinstance(train, SplitTensors)
        and len(train) >= settings.batch_size
    )
