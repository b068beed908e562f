"""The head's training step in closed form takes the steps autograd would take."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from head.adam import Adam
from head.features import SplitTensors
from head.graphs import EpochGraph, graphed_epoch, graphed_step
from head.model import initial_head
from head.step import closed_form_step
from head.training import Run, Settings, adam, train_epoch


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


class EagerReplay:
    """Stands in for the CUDA graph on the CPU: each replay runs the captured steps eagerly."""

    def __init__(self, run, train, settings):
        self.arguments = run, train, settings

    def replay(self) -> None:
        run, train, settings = self.arguments
        for _ in range(run.graph.steps):
            graphed_step(run, train, settings.batch_size, settings.precision == "bf16", run.graph)


def new_test_run(settings: Settings, standardized: bool) -> Run:
    head = initial_head(64, 11, seed=0)
    generator = torch.Generator().manual_seed(settings.seed)
    mean = std = None
    if standardized:
        mean, std = torch.full((64,), 0.5), torch.full((64,), 2.0)
    return Run(head=head, optimizer=adam(head, settings), generator=generator, mean=mean, std=std)


@pytest.mark.parametrize("batch_size", [8, 7])  # 56 rows: full batches only, and a short one
@pytest.mark.parametrize("flip", [False, True])
def test_the_steps_a_graph_captures_walk_the_epoch_as_the_eager_loop(batch_size, flip):
    """The captured step reads its rows through a device-side offset into the epoch's order;
    run eagerly here, three epochs of it equal three epochs of the eager loop."""
    features, labels = batch(5, rows=56)
    train = SplitTensors("train", features.half(), labels, features.flip(1).half())
    settings = Settings(batch_size=batch_size, flip=flip, weight_decay=0.01, progress=False)
    eager, graphed = new_test_run(settings, True), new_test_run(settings, True)
    full_steps = len(train) // batch_size
    graphed.graph = EpochGraph(
        graph=EagerReplay(graphed, train, settings),
        steps=max(d for d in range(1, 5) if full_steps % d == 0),
        order=torch.zeros(len(train), dtype=torch.int64),
        flipped=torch.zeros(len(train), dtype=torch.bool) if flip else None,
        offset=torch.zeros((), dtype=torch.int64),
        loss_sum=torch.zeros((), dtype=torch.float64),
        correct=torch.zeros((), dtype=torch.int64),
    )
    with tqdm(disable=True) as bar:
        for _ in range(3):
            expected = train_epoch(eager, train, settings, bar)
            got = graphed_epoch(graphed, train, settings, bar)
            assert got.loss == pytest.approx(expected.loss, abs=1e-6)
            assert got.top1 == expected.top1
    torch.testing.assert_close(graphed.head.weight, eager.head.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(graphed.head.bias, eager.head.bias, rtol=0, atol=1e-6)
    assert torch.equal(graphed.generator.get_state(), eager.generator.get_state())
