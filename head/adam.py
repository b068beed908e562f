"""Adam for the head's weight and bias: torch's own fused Adam kernel, without `torch.optim`.

`torch.optim.Optimizer` imports the TorchDynamo compiler stack on first use (sympy and some
900 modules: about 155 MB resident and a second of start-up) to fence its methods from
compilation. The head never compiles anything, and training holds the features in memory,
so those 155 MB are a tenth of the whole run. This module calls the same kernel that
`torch.optim.Adam(fused=True)` calls, with the same arguments, and reads and writes the same
`state_dict` layout, so a checkpoint's ``optimizer`` loads into `torch.optim.Adam` as well.

A grid of K heads trained at once is one wide layer, weight (K*C, D) and bias (K*C,), with a
learning rate and a weight decay per head: `lr` and `weight_decay` given as lists of K values.
Adam works element by element, so each head's rows are stepped by the same kernel with that
head's two numbers (one call per run of neighbouring heads that share them), and end exactly
where an Adam of that head alone would. One head is the case K = 1, given as plain floats.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch import nn

BETAS = (0.9, 0.999)
EPS = 1e-8
# Float32 copies of every weight Adam trains: the weight, its gradient and the two moments.
COPIES = 4


def grid_memory_bytes(heads: int, classes: int, dim: int) -> int:
    """Bytes of a K-head layer of `classes` outputs over `dim` features while Adam trains it:
    weight and bias, their gradient and Adam's two moments, all float32."""
    return heads * classes * (dim + 1) * 4 * COPIES


def largest_grid(classes: int, dim: int, available: int) -> int:
    """The most heads whose `grid_memory_bytes` fit in `available` bytes (0 when none does)."""
    return max(0, available // grid_memory_bytes(1, classes, dim))


@dataclasses.dataclass
class Adam:
    """Adam (L2 weight decay added to the gradient, as `torch.optim.Adam`) over `params`; with
    lists of K values for `lr` and `weight_decay`, every parameter's rows are K equal blocks,
    block k stepped with lr[k] and weight_decay[k]."""

    params: list[nn.Parameter]
    lr: float | list[float]
    weight_decay: float | list[float] = 0.0
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        heads = self.heads
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != heads:
                raise ValueError(f"{name}: {len(value)} values for {heads} heads")
        for param in self.params:
            if len(param) % heads:
                raise ValueError(f"{len(param)} rows cannot be split into {heads} heads")
        if not self.steps:
            self.exp_avgs = [
                torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
            ]
            self.exp_avg_sqs = [
                torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
            ]
            self.steps = [
                torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params
            ]

    @property
    def heads(self) -> int:
        """K: the length of `lr` or `weight_decay` when either is a list, else 1."""
        for value in (self.lr, self.weight_decay):
            if isinstance(value, list):
                return len(value)
        return 1

    def settings(self, head: int) -> tuple[float, float]:
        """(lr, weight decay) of one head."""
        lr, decay = self.lr, self.weight_decay
        return (
            lr[head] if isinstance(lr, list) else lr,
            decay[head] if isinstance(decay, list) else decay,
        )

    def spans(self) -> Iterator[tuple[int, int, float, float]]:
        """(first head, end head, lr, weight decay) of each run of neighbouring heads that share
        both: one kernel call each, so a grid whose innermost axis is not lr or weight decay
        (standardize on and off) takes half the calls."""
        groups = itertools.groupby(range(self.heads), key=self.settings)
        for (lr, decay), members in groups:
            members = list(members)
            yield members[0], members[-1] + 1, lr, decay

    def rows(self, tensors: list[torch.Tensor], first: int, end: int) -> list[torch.Tensor]:
        """The rows of heads `first` to `end` - 1 of each tensor: contiguous views."""
        return [t[len(t) // self.heads * first : len(t) // self.heads * end] for t in tensors]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        # A context, not a decorator, so that the mutation run (make mutation) can reach the body.
        with torch.no_grad():
            torch._foreach_add_(self.steps, 1)
            tensors = [self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs]
            for first, end, lr, decay in self.spans():
                # The kernel updates the views of the span's rows in place; one span is all rows.
                params, grads, exp_avgs, exp_avg_sqs = (
                    group if (first, end) == (0, self.heads) else self.rows(group, first, end)
                    for group in tensors
                )
                torch._fused_adam_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    self.steps,
                    amsgrad=False,
                    lr=lr,
                    beta1=BETAS[0],
                    beta2=BETAS[1],
                    weight_decay=decay,
                    eps=EPS,
                    maximize=False,
                )

    def state_dict(self) -> dict:
        """The layout of `torch.optim.Adam(fused=True).state_dict()`, tensors copied (with K
        heads, ``lr`` and ``weight_decay`` are the lists, which torch.optim cannot load)."""
        return {
            "state": {
                index: {
                    "step": step.clone(),
                    "exp_avg": exp_avg.clone(),
                    "exp_avg_sq": exp_avg_sq.clone(),
                }
                for index, (step, exp_avg, exp_avg_sq) in enumerate(
                    zip(self.steps, self.exp_avgs, self.exp_avg_sqs)
                )
            },
            "param_groups": [
                {
                    "lr": self.lr,
                    "betas": BETAS,
                    "eps": EPS,
                    "weight_decay": self.weight_decay,
                    "amsgrad": False,
                    "maximize": False,
                    "foreach": None,
                    "capturable": False,
                    "differentiable": False,
                    "fused": True,
                    "decoupled_weight_decay": False,
                    "params": list(range(len(self.params))),
                }
            ],
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from a saved state (ours or `torch.optim.Adam`'s) of the same parameters."""
        state = saved["state"]
        for index, param in enumerate(self.params):
            entry = state[index]
            # A copy: `as_tensor` would share a live optimizer's step counter with this one.
            step = torch.as_tensor(entry["step"], dtype=torch.float32)
            self.steps[index] = step.to(param.device).clone()
            self.exp_avgs[index] = entry["exp_avg"].to(param.device, param.dtype).clone()
            self.exp_avg_sqs[index] = entry["exp_avg_sq"].to(param.device, param.dtype).clone()

    def head_state_dict(self, head: int) -> dict:
        """The state of one head alone, as its own single-head Adam would save it: its rows of
        each moment, its lr and weight decay. Loads into `Adam` or `torch.optim.Adam`."""
        with torch.no_grad():
            alone = Adam(
                self.rows(self.params, head, head + 1),
                *self.settings(head),
                exp_avgs=self.rows(self.exp_avgs, head, head + 1),
                exp_avg_sqs=self.rows(self.exp_avg_sqs, head, head + 1),
                steps=self.steps,
            )
        return alone.state_dict()
