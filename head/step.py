"""One training step and the batches an epoch feeds it.

The step needs no autograd: for logits = X W^T + b and the mean cross-entropy over a batch of
B rows, dL/dlogits = (softmax(logits) - onehot(labels)) / B, dW = G^T X and db = sum(G), two
matrix products (`closed_form_step`). It is a function of the layer's weight and bias and a batch;
`train_step` adds the standardisation and the Adam step.

An epoch draws a permutation (and, with flipped features, a plain-or-flipped choice per image)
from the run's `torch.Generator` (`epoch_order`) and gathers the batches from the in-memory
split (`memory_batches`) or from the file, block by block (`stream_batches`), in the stored
dtype; `gather` is the one row gather, with the flipped view where the draw says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from extract import store
from head.features import CPU, SplitTensors, StreamedSplit

if TYPE_CHECKING:
    from head.training import Run


def gather(
    features: torch.Tensor,
    rows: torch.Tensor,
    features_flip: torch.Tensor | None = None,
    use_flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows `rows` of `features`, or of `features_flip` where `use_flip` (one flag per row of
    `rows`) says so, in the stored dtype: half the bytes of float32, cast after. index_select
    is the fastest row gather on CPUs, 3x advanced indexing."""
    gathered = features.index_select(0, rows)
    if use_flip is not None:
        gathered = torch.where(use_flip[:, None], features_flip.index_select(0, rows), gathered)
    return gathered


def flips(use_flip: torch.Tensor | None, take: torch.Tensor) -> torch.Tensor | None:
    return None if use_flip is None else use_flip[take]


def stream_batches(
    split: StreamedSplit, batch_size: int, generator: torch.Generator, device: torch.device = CPU
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled (features, labels) batches from the file, in the stored dtype.

    Draws from `generator`: the order of the blocks, then for each buffer fill a permutation of
    the rows it holds for the split (and, with flip, which rows use the mirrored view). Blocks
    are read whole, in file order within a fill; batches run on across fills, so every batch is
    full but the last. A part of a split (`StreamedSplit.part`) draws only from its own rows.
    """
    names = ["features", "features_flip"] if split.flip else ["features"]
    capacity = split.buffer_blocks * split.block_rows
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    with store.open_file(split.path) as file:
        info = store.split_info(file, split.name)
        buffers = {name: np.empty((capacity, info.shape[1]), info.dtype) for name in names}
        order = torch.randperm(split.blocks, generator=generator)
        for first in range(0, split.blocks, split.buffer_blocks):
            filled, held, labels = 0, [], []
            for block in order[first : first + split.buffer_blocks].sort().values.tolist():
                start, stop = split.block_range(block)
                for name in names:
                    store.read_rows_into(file, split.name, name, buffers[name], start, stop, filled)
                offsets, block_labels = split.held_in(start, stop)
                offsets = torch.arange(stop - start) if offsets is None else offsets
                held.append(offsets + filled)
                labels.append(split.labels[block_labels])
                filled += stop - start
            # Labels by buffer row; rows the split does not hold (a holdout's) are never drawn.
            positions = torch.cat(held)
            by_row = torch.zeros(filled, dtype=torch.int64)
            by_row[positions] = torch.cat(labels)
            labels = by_row.to(device)
            views = [torch.from_numpy(buffers[name][:filled]).to(device) for name in names]
            count = len(positions)
            permutation = positions[torch.randperm(count, generator=generator)].to(device)
            use_flip = (
                (torch.rand(filled, generator=generator) < 0.5).to(device) if split.flip else None
            )

            position = 0
            if carry is not None:
                take = permutation[: batch_size - len(carry[1])]
                carry = (
                    torch.cat([carry[0], gather(views[0], take, views[-1], flips(use_flip, take))]),
                    torch.cat([carry[1], labels[take]]),
                )
                position = len(take)
                if len(carry[1]) == batch_size:
                    yield carry
                    carry = None
            while carry is None and position + batch_size <= count:
                take = permutation[position : position + batch_size]
                yield gather(views[0], take, views[-1], flips(use_flip, take)), labels[take]
                position += batch_size
            if carry is None and position < count:
                take = permutation[position:]
                carry = (gather(views[0], take, views[-1], flips(use_flip, take)), labels[take])
    if carry is not None:
        yield carry


def epoch_order(
    count: int, generator: torch.Generator, flip: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This epoch's sample order and, with flipped features, which images use the flipped view."""
    order = torch.randperm(count, generator=generator)
    flipped = torch.rand(count, generator=generator) < 0.5 if flip else None
    return order, flipped


def memory_batches(
    train: SplitTensors, batch_size: int, generator: torch.Generator, flip: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (features, labels) batches of the in-memory split, in the stored dtype."""
    device = train.features.device
    order, flipped = epoch_order(len(train), generator, flip and train.features_flip is not None)
    order = order.to(device)
    if flipped is not None:
        flipped = flipped.to(device)
    for start in range(0, len(train), batch_size):
        rows = order[start : start + batch_size]
        use_flip = None if flipped is None else flipped[start : start + batch_size]
        features = gather(train.features, rows, train.features_flip, use_flip)
        yield features, train.labels.index_select(0, rows)


def closed_form_step(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``features @ weight.T + bias`` and its gradient, without autograd.

    Sets ``weight.grad`` and ``bias.grad``; returns (loss, logits). With `bf16` the products run
    in bfloat16 as under autocast (the logits, G, dW and db in bfloat16, cast to float32), so
    the steps are those autograd takes with ``torch.autocast(dtype=torch.bfloat16)``.
    """
    # A context, not a decorator, so that the mutation run (make mutation) can reach the body.
    with torch.no_grad():
        if bf16:
            logits = torch.addmm(bias.bfloat16(), features.bfloat16(), weight.bfloat16().t())
        else:
            logits = torch.addmm(bias, features, weight.t())
        log_probs = logits.float().log_softmax(1)
        loss = -log_probs.gather(1, labels[:, None]).mean()
        gradient = log_probs.exp_()  # softmax
        gradient.scatter_add_(1, labels[:, None], torch.full_like(log_probs[:, :1], -1.0))
        gradient.div_(len(labels))
        if bf16:
            gradient = gradient.bfloat16()
            weight.grad = torch.mm(gradient.t(), features.bfloat16()).float()
            bias.grad = gradient.sum(0).float()
        else:
            weight.grad = torch.mm(gradient.t(), features)
            bias.grad = gradient.sum(0)
        return loss, logits


def train_step(
    run: Run,
    features: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
    loss_sum: torch.Tensor,
    correct: torch.Tensor,
) -> None:
    """One Adam step on a batch in the stored dtype; adds its loss and hits to the sums."""
    features = features.float()
    if run.mean is not None:
        features = (features - run.mean) / run.std
    loss, logits = closed_form_step(run.head.weight, run.head.bias, features, labels, bf16)
    run.optimizer.step()
    loss_sum.add_(loss.double() * len(labels))
    correct.add_((logits.argmax(1) == labels).sum())
