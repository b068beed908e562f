"""Adam for the head's weight and bias: torch's own fused Adam kernel, without `torch.optim`.

`torch.optim.Optimizer` imports the TorchDynamo compiler stack on first use (sympy and some
900 modules: about 155 MB resident and a second of start-up) to fence its methods from
compilation. The head never compiles anything, and training holds the features in memory,
so those 155 MB are a tenth of the whole run. This module calls the same kernel that
`torch.optim.Adam(fused=True)` calls, with the same arguments, and reads and writes the same
`state_dict` layout, so a checkpoint's ``optimizer`` loads into `torch.optim.Adam` as well.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclasses.dataclass
class Adam:
    """Adam (L2 weight decay added to the gradient, as `torch.optim.Adam`) over `params`."""

    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
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

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.steps, 1)
        torch._fused_adam_(
            self.params,
            [p.grad for p in self.params],
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            amsgrad=False,
            lr=self.lr,
            beta1=BETAS[0],
            beta2=BETAS[1],
            weight_decay=self.weight_decay,
            eps=EPS,
            maximize=False,
        )

    def state_dict(self) -> dict:
        """The layout of `torch.optim.Adam(fused=True).state_dict()`, tensors copied."""
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
