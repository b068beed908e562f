"""Weighted k-nearest-neighbour classification on cached features: a zero-training baseline.

As DINOv2's k-NN evaluation: rows are L2-normalised, similarity is the cosine, each of the k
nearest train rows votes for its class with weight exp(similarity / T), T = 0.07, and every k
of a list is read from one search for the largest. The votes of each k, normalised to sum to 1,
are its class probabilities.

The search never holds the whole query x train similarity matrix (10,000 x 100,000 float32 is
4 GB): the train split is read once, block by block (from memory, or from the file when
streamed), each block is compared with the queries a chunk at a time, and only the best
max(k) similarities and their rows are kept per query. `memory_bytes` states the bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from extract.errors import Option, UserError
from head.features import CPU, SplitTensors, StreamedSplit, split_blocks

TEMPERATURE = 0.07
QUERY_ROWS = 1024  # queries compared with a train block at a time
TRAIN_ROWS = 4096  # train rows in a block when the split is in memory (streamed: its blocks)


@dataclasses.dataclass
class KnnResult:
    """One k's classification of the query split."""

    k: int
    top1: float  # percent
    top5: float  # percent: the label has votes and fewer than 5 classes have more
    predictions: torch.Tensor  # (Q,) int64: the class with the most votes (the lowest on a tie)
    probabilities: torch.Tensor  # (Q, C) float32: the votes, each row summing to 1


def check_ks(ks: Iterable[int], train_rows: int) -> list[int]:
    """The distinct values of k, ascending; refused with the flag's name when one is not
    between 1 and the number of train rows."""
    values = sorted(set(ks))
    if not values:
        raise UserError(Option("knn"), ": give at least one k")
    if values[0] < 1:
        raise UserError(Option("knn"), f": k must be at least 1 (got {values[0]})")
    if values[-1] > train_rows:
        raise UserError(
            Option("knn"),
            f": k = {values[-1]} is larger than the train split ({train_rows} images)",
        )
    return values


def memory_bytes(
    queries: int,
    classes: int,
    dim: int,
    ks: list[int],
    query_rows: int = QUERY_ROWS,
    train_rows: int = TRAIN_ROWS,
) -> int:
    """Peak memory of `classify` beyond the features themselves.

    Working set: one train block and one query chunk as read and as normalised float32, their
    similarities, the candidates (kept and new) and topk's choice among them; kept: max(k)
    similarities (float32) and rows (int64) per query; returned: Q x C float32 per k. At the
    defaults and D = 4096 the working set is 210 MiB; smaller `train_rows` lowers it.
    """
    kmax = max(ks)
    working = 8 * (train_rows + query_rows) * dim + 12 * query_rows * (train_rows + kmax)
    kept = 12 * queries * kmax
    returned = 4 * queries * classes * len(ks) + 8 * queries * len(ks)
    return working + kept + returned


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Rows as float32 of unit length (a zero row stays zero)."""
    rows = features.to(torch.float32, copy=True)
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def query_chunks(
    query: SplitTensors | StreamedSplit, rows: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, normalised features) of the query split, chunk by chunk."""
    start = 0
    for features, _ in split_blocks(query, rows, device):
        for offset in range(0, len(features), rows):
            chunk = features[offset : offset + rows]
            yield start + offset, normalised(chunk)
        start += len(features)


def nearest(
    train: SplitTensors | StreamedSplit,
    query: SplitTensors | StreamedSplit,
    kmax: int,
    device: torch.device = CPU,
    query_rows: int = QUERY_ROWS,
    train_rows: int = TRAIN_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, train rows) of each query's `kmax` nearest train rows, most similar first.

    The train split is read once; a streamed query split is read once per train block.
    """
    count = len(query)
    similarities = torch.full((count, kmax), -torch.inf, device=device)
    rows = torch.zeros((count, kmax), dtype=torch.int64, device=device)
    start = 0
    for block, _ in split_blocks(train, train_rows, device):
        keys = normalised(block)
        for first, queries in query_chunks(query, query_rows, device):
            stop = first + len(queries)
            candidates = torch.cat([similarities[first:stop], queries @ keys.T], dim=1)
            best = candidates.topk(kmax, dim=1)
            # Columns before kmax are kept rows; the others this block's, offset by its start.
            kept = rows[first:stop].gather(1, best.indices.clamp(max=kmax - 1))
            rows[first:stop] = torch.where(best.indices < kmax, kept, best.indices - kmax + start)
            similarities[first:stop] = best.values
        start += len(keys)
    return similarities, rows


def classify(
    train: SplitTensors | StreamedSplit,
    query: SplitTensors | StreamedSplit,
    ks: Iterable[int],
    num_classes: int,
    temperature: float = TEMPERATURE,
    device: torch.device = CPU,
    query_rows: int = QUERY_ROWS,
    train_rows: int = TRAIN_ROWS,
) -> dict[int, KnnResult]:
    """Classify every row of `query` by its nearest rows of `train`, for each k in `ks`.

    One search for max(k) serves every k; memory beyond the features stays within
    `memory_bytes`. The returned tensors are on `device`.
    """
    values = check_ks(ks, len(train))
    similarities, rows = nearest(train, query, values[-1], device, query_rows, train_rows)
    neighbour_labels = train.labels.to(device)[rows]
    # exp((s - s_max) / T): the same ratios as exp(s / T), without overflow.
    weights = ((similarities - similarities[:, :1]) / temperature).exp()
    labels = query.labels.to(device)
    results = {}
    for k in values:
        votes = torch.zeros((len(labels), num_classes), device=device)
        votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        predictions = votes.argmax(1)
        own = votes.gather(1, labels[:, None]).squeeze(1)
        above = (votes > own[:, None]).sum(1)
        count = len(labels)
        results[k] = KnnResult(
            k=k,
            top1=100.0 * (predictions == labels).sum().item() / count,
            top5=100.0 * ((own > 0) & (above < 5)).sum().item() / count,
            predictions=predictions,
            probabilities=votes / votes.sum(1, keepdim=True),
        )
    return results
