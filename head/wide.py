"""K linear heads as one wide layer: weight (K*C, D) and bias (K*C,), head k in rows k*C..(k+1)*C.

Every head reads the same batch, so the K forward products are one (B, D) x (D, K*C) product
and the K weight gradients one (K*C, B) x (B, D) product: the batch is gathered and cast once,
and the matrix products are wide enough to keep a CPU's or GPU's units busy where one head's
(B, D) x (D, C) is not. Standardised heads read the standardised view of the batch: the raw
heads' rows come first and the standardised ones after, so each group is one product on its
own view. The softmax and the cross-entropy are taken per head over its own C logits, so a
head's gradient is exactly the one `step.closed_form_step` gives it alone; Adam works
element by element, so with a per-head learning rate and weight decay each head follows the
steps an ordinary run takes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from head.adam import Adam
from head.features import SplitTensors, StreamedSplit, split_blocks
from head.grid import Cell
from head.model import fold_standardization

EVAL_ROWS = 1024  # validation rows per product: 1024 x K*C float32 logits (32 MB for 40 x 200)


@dataclasses.dataclass
class WideLayer:
    """The heads of a grid; head k trains with ``cells[k]``."""

    weight: torch.Tensor  # (K*C, D) float32, in each head's own (raw or standardised) space
    bias: torch.Tensor  # (K*C,)
    classes: int
    cells: list[Cell]
    mean: torch.Tensor | None  # standardisation of the standardised heads' view
    std: torch.Tensor | None
    optimizer: Adam | None = None  # a learning rate and weight decay per head

    def __post_init__(self) -> None:
        self.weight.grad = torch.zeros_like(self.weight)
        self.bias.grad = torch.zeros_like(self.bias)
        if self.optimizer is None:
            self.optimizer = self.new_optimizer()

    def new_optimizer(self) -> Adam:
        """Adam over each view's rows, head k of every view with the k-th (lr, weight decay).

        The grid repeats the same (lr, weight decay) list in each view, so Adam's head k is the
        k-th cell of every view at once: one fused-kernel call steps a raw head and its
        standardised twin together, half the calls of one per head (the step's largest cost on
        a CPU).
        """
        params = []
        for rows, _ in self.groups():
            for tensor in (self.weight, self.bias):
                view = tensor[rows]
                view.grad = tensor.grad[rows]
                params.append(view)
        per_view = self.heads // len(self.groups())
        settings = [(cell.lr, cell.weight_decay) for cell in self.cells]
        if settings != settings[:per_view] * len(self.groups()):
            raise ValueError("each view must hold the same (lr, weight decay) list")
        return Adam(
            params,
            lr=[lr for lr, _ in settings[:per_view]],
            weight_decay=[decay for _, decay in settings[:per_view]],
        )

    def groups(self) -> list[tuple[slice, bool]]:
        """(rows of the wide tensors, standardised) of each view present, raw first."""
        split = self.raw_heads * self.classes
        present = [(slice(0, split), False), (slice(split, len(self.bias)), True)]
        return [(rows, standardized) for rows, standardized in present if rows.stop > rows.start]

    def head_optimizer_state(self, head: int) -> dict:
        """Head `head`'s Adam state as its own run's optimizer would save it (weight, bias)."""
        per_view = self.heads // len(self.groups())
        view, index = divmod(head, per_view)
        state = self.optimizer.head_state_dict(index)
        entries = state["state"]
        state["state"] = {0: entries[2 * view], 1: entries[2 * view + 1]}
        state["param_groups"][0]["params"] = [0, 1]
        return state

    @property
    def heads(self) -> int:
        return len(self.cells)

    @property
    def raw_heads(self) -> int:
        """Heads on raw features: the first ones (`grid.cells` puts them first)."""
        return sum(not cell.standardize for cell in self.cells)


def new_layer(
    cells: list[Cell],
    raw_head: nn.Linear,
    standardized_head: nn.Linear | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
) -> WideLayer:
    """Every head starts from the weights an ordinary run with its settings starts from."""
    starts = [standardized_head if cell.standardize else raw_head for cell in cells]
    return WideLayer(
        weight=torch.cat([start.weight.detach() for start in starts]).float().contiguous(),
        bias=torch.cat([start.bias.detach() for start in starts]).float().contiguous(),
        classes=raw_head.out_features,
        cells=list(cells),
        mean=mean,
        std=std,
    )


def views(layer: WideLayer, features: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
    """(rows of the wide layer, the view of the float32 batch they read), one per group."""
    return [
        (rows, (features - layer.mean) / layer.std if standardized else features)
        for rows, standardized in layer.groups()
    ]


def train_step(
    layer: WideLayer,
    features: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
    loss_sums: torch.Tensor,
    correct: torch.Tensor,
) -> None:
    """One Adam step of every head on a batch in the stored dtype; adds each head's loss and
    hits to `loss_sums` and `correct` (K,). The arithmetic per head is that of
    `step.closed_form_step` and `step.train_step`."""
    with torch.no_grad():
        groups = views(layer, features.float())
        count, heads, classes = len(labels), layer.heads, layer.classes
        if bf16:
            parts = [
                torch.addmm(
                    layer.bias[rows].bfloat16(), view.bfloat16(), layer.weight[rows].bfloat16().t()
                )
                for rows, view in groups
            ]
        else:
            parts = [
                torch.addmm(layer.bias[rows], view, layer.weight[rows].t()) for rows, view in groups
            ]
        logits = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).view(count, heads, classes)
        log_probs = logits.float().log_softmax(2)
        targets = labels[:, None, None].expand(count, heads, 1)
        loss = -log_probs.gather(2, targets).squeeze(2).mean(0)
        gradient = log_probs.exp_()
        gradient.scatter_add_(2, targets, torch.full_like(log_probs[..., :1], -1.0))
        gradient.div_(count)
        gradient = gradient.view(count, heads * classes)
        if bf16:
            gradient = gradient.bfloat16()
            for rows, view in groups:
                layer.weight.grad[rows] = torch.mm(gradient[:, rows].t(), view.bfloat16()).float()
            layer.bias.grad.copy_(gradient.sum(0).float())
        else:
            for rows, view in groups:
                torch.mm(gradient[:, rows].t(), view, out=layer.weight.grad[rows])
            torch.sum(gradient, 0, out=layer.bias.grad)
        layer.optimizer.step()
        loss_sums.add_(loss.double() * count)
        correct.add_((logits.argmax(2) == labels[:, None]).sum(0))


def exported(layer: WideLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head as a layer on raw features (standardisation folded in), as a checkpoint holds
    it; the raw heads' rows are the training tensors themselves, not copies."""
    split = layer.raw_heads * layer.classes
    if split == len(layer.bias):
        return layer.weight.detach(), layer.bias.detach()
    folded = fold_standardization(
        layer.weight[split:].detach(), layer.bias[split:].detach(), layer.mean, layer.std
    )
    if split == 0:
        return folded["weight"], folded["bias"]
    return (
        torch.cat([layer.weight[:split].detach(), folded["weight"]]),
        torch.cat([layer.bias[:split].detach(), folded["bias"]]),
    )


@dataclasses.dataclass
class HeadScores:
    """Per-head scores (K,) of one split: mean cross-entropy, top-1 and top-5 in percent."""

    loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor


def split_scores(
    weight: torch.Tensor,
    bias: torch.Tensor,
    classes: int,
    split: SplitTensors | StreamedSplit,
    device: torch.device,
) -> HeadScores:
    """`scoring.split_scores` for every head of a raw-feature wide layer at once."""
    heads = len(bias) // classes
    loss = torch.zeros(heads, dtype=torch.float64, device=device)
    top1 = torch.zeros(heads, dtype=torch.int64, device=device)
    top5 = torch.zeros(heads, dtype=torch.int64, device=device)
    for features, labels in split_blocks(split, EVAL_ROWS, device):
        logits = torch.addmm(bias, features.float(), weight.t()).view(len(labels), heads, classes)
        hits = logits.topk(min(5, classes), dim=2).indices == labels[:, None, None]
        targets = labels[:, None, None].expand(len(labels), heads, 1)
        loss -= logits.log_softmax(2).gather(2, targets).squeeze(2).double().sum(0)
        top1 += hits[..., 0].sum(0)
        top5 += hits.any(dim=2).sum(0)
    count = len(split)
    return HeadScores(
        loss=(loss / count).cpu(),
        top1=(100.0 * top1.double() / count).cpu(),
        top5=(100.0 * top5.double() / count).cpu(),
    )
