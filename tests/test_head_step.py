"""The head's training step in closed form takes the steps autograd would take."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from head.adam import Adam
from head.training import closed_form_step


def batch(seed: int, rows: int = 37, dim: int = 64, classes: int = 11):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator).relu() * 3
    labels = torch.randint(0, classes, (rows,), generator=generator)
    return features, labels


def autograd_gradients(head: nn.Linear, features, labels, bf16: bool):
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = head(features)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return loss.detach(), logits.detach(), head.weight.grad.clone(), head.bias.grad.clone()


@pytest.mark.parametrize("bf16", [False, True])
def test_closed_form_gradient_equals_autograd(bf16):
    torch.manual_seed(0)
    head = nn.Linear(64, 11)
    features, labels = batch(1)
    loss, logits, weight_grad, bias_grad = autograd_gradients(head, features, labels, bf16)
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    ours_loss, ours_logits = closed_form_step(weight, bias, features, labels, bf16)
    torch.testing.assert_close(ours_loss, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad, weight_grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.grad, bias_grad, rtol=0, atol=1e-6)
    assert weight_grad.abs().max() > 1e-2  # not vacuous


def test_closed_form_adam_steps_follow_autograd_adam_steps():
    """Ten Adam steps with weight decay on both sides: the weights stay within 1e-6."""
    torch.manual_seed(0)
    reference = nn.Linear(64, 11)
    ours = nn.Linear(64, 11)
    ours.load_state_dict(reference.state_dict())
    reference_adam = Adam([reference.weight, reference.bias], lr=1e-3, weight_decay=0.01)
    ours_adam = Adam([ours.weight, ours.bias], lr=1e-3, weight_decay=0.01)
    for seed in range(10):
        features, labels = batch(seed)
        autograd_gradients(reference, features, labels, bf16=False)
        reference_adam.step()
        closed_form_step(ours.weight, ours.bias, features, labels, bf16=False)
        ours_adam.step()
    torch.testing.assert_close(ours.weight, reference.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.bias, reference.bias, rtol=0, atol=1e-6)
