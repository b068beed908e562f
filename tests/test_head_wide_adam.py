"""K heads as one wide layer under Adam with a learning rate and weight decay per head: each head
steps as its own single-head Adam would. CPU float32 unless a test says CUDA; tolerance 1e-5
relative, and 1e-7 absolute for the few weights that pass near zero (the weights are about
0.1). Single-head Adam runs the same kernel, but over other lengths, so its vectorised loop and
its scalar tail meet different elements: a few last bits differ. torch.optim.Adam (not fused) is
the reference that shares no code with ours."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from head.adam import Adam, grid_memory_bytes, largest_grid

CLASSES, DIM = 5, 64
# Heads 1 and 2 share both settings (one kernel call for the two); head 0 has no weight decay.
LRS = [1e-2, 3e-3, 3e-3, 1e-3]
DECAYS = [0.0, 1e-3, 1e-3, 1e-2]


def wide_layer(heads: int, device: str = "cpu") -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(DIM, heads * CLASSES).to(device)


def gradients(steps: int, heads: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random gradients of the wide weight and bias, of unequal scale per step."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(heads * CLASSES, DIM, generator=generator) * (1 + step % 7),
            torch.randn(heads * CLASSES, generator=generator),
        )
        for step in range(steps)
    ]


def apply(params: list[torch.Tensor], optimizer, grads) -> None:
    for weight_grad, bias_grad in grads:
        params[0].grad = weight_grad.to(params[0].device)
        params[1].grad = bias_grad.to(params[1].device)
        optimizer.step()


def per_head_reference(layer: nn.Linear, grads, make) -> list[nn.Linear]:
    """Each head's rows as a layer of its own, stepped by `make(params, lr, weight_decay)`."""
    heads = []
    for head, (lr, decay) in enumerate(zip(LRS, DECAYS)):
        rows = slice(head * CLASSES, (head + 1) * CLASSES)
        alone = nn.Linear(DIM, CLASSES)
        with torch.no_grad():
            alone.weight.copy_(layer.weight[rows])
            alone.bias.copy_(layer.bias[rows])
        own = [(w[rows], b[rows]) for w, b in grads]
        apply([alone.weight, alone.bias], make([alone.weight, alone.bias], lr, decay), own)
        heads.append(alone)
    return heads


@pytest.mark.parametrize(
    "reference",
    [
        lambda params, lr, decay: Adam(params, lr=lr, weight_decay=decay),
        lambda params, lr, decay: torch.optim.Adam(params, lr=lr, weight_decay=decay),
    ],
    ids=["single-head Adam", "torch.optim.Adam"],
)
def test_each_head_ends_where_its_own_adam_ends_after_200_steps(reference):
    grads = gradients(200, len(LRS))
    start = wide_layer(len(LRS))
    layer = wide_layer(len(LRS))
    optimizer = Adam([layer.weight, layer.bias], lr=LRS, weight_decay=DECAYS)
    assert list(optimizer.spans()) == [(0, 1, 1e-2, 0.0), (1, 3, 3e-3, 1e-3), (3, 4, 1e-3, 1e-2)]
    apply([layer.weight, layer.bias], optimizer, grads)
    expected = per_head_reference(start, grads, reference)
    for head, alone in enumerate(expected):
        rows = slice(head * CLASSES, (head + 1) * CLASSES)
        torch.testing.assert_close(layer.weight[rows], alone.weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias[rows], alone.bias, rtol=1e-5, atol=1e-7)
    # Negative control: the settings matter, so a head stepped with another's would not pass.
    moved = (layer.weight[:CLASSES] - start.weight[:CLASSES]).abs().max()
    swapped = (expected[3].weight - layer.weight[:CLASSES]).abs().max()
    assert swapped > 0.1 * moved > 0


def test_one_head_as_floats_or_as_lists_of_one_is_the_ordinary_adam():
    grads = gradients(30, 1)
    results = []
    for lr, decay in ((1e-2, 1e-3), ([1e-2], [1e-3]), (1e-2, [1e-3])):
        layer = wide_layer(1)
        optimizer = Adam([layer.weight, layer.bias], lr=lr, weight_decay=decay)
        assert optimizer.heads == 1
        apply([layer.weight, layer.bias], optimizer, grads)
        results.append(layer.state_dict())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)


def test_resuming_from_the_state_dict_matches_an_uninterrupted_run():
    grads = gradients(60, len(LRS))
    straight = wide_layer(len(LRS))
    apply(
        [straight.weight, straight.bias],
        Adam([straight.weight, straight.bias], lr=LRS, weight_decay=DECAYS),
        grads,
    )
    first = wide_layer(len(LRS))
    optimizer = Adam([first.weight, first.bias], lr=LRS, weight_decay=DECAYS)
    apply([first.weight, first.bias], optimizer, grads[:25])
    saved, weights = optimizer.state_dict(), first.state_dict()
    assert saved["param_groups"][0]["lr"] == LRS
    resumed = wide_layer(len(LRS))
    resumed.load_state_dict(weights)
    again = Adam([resumed.weight, resumed.bias], lr=LRS, weight_decay=DECAYS)
    again.load_state_dict(saved)
    apply([resumed.weight, resumed.bias], again, grads[25:])
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=0)


def test_one_heads_state_continues_in_torch_optim_adam_as_in_the_grid():
    grads = gradients(40, len(LRS))
    layer = wide_layer(len(LRS))
    optimizer = Adam([layer.weight, layer.bias], lr=LRS, weight_decay=DECAYS)
    apply([layer.weight, layer.bias], optimizer, grads[:20])
    head = 2
    rows = slice(head * CLASSES, (head + 1) * CLASSES)
    alone = nn.Linear(DIM, CLASSES)
    alone.load_state_dict({"weight": layer.weight[rows], "bias": layer.bias[rows]})
    torch_adam = torch.optim.Adam(alone.parameters(), lr=1.0, fused=True)
    torch_adam.load_state_dict(optimizer.head_state_dict(head))
    assert torch_adam.param_groups[0]["lr"] == LRS[head]
    assert torch_adam.param_groups[0]["weight_decay"] == DECAYS[head]
    apply([layer.weight, layer.bias], optimizer, grads[20:])
    apply([alone.weight, alone.bias], torch_adam, [(w[rows], b[rows]) for w, b in grads[20:]])
    torch.testing.assert_close(alone.weight, layer.weight[rows], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alone.bias, layer.bias[rows], rtol=1e-5, atol=1e-7)


def test_grid_memory_counts_every_float32_copy_adam_holds():
    layer = wide_layer(3)
    optimizer = Adam([layer.weight, layer.bias], lr=[1e-3] * 3)
    apply([layer.weight, layer.bias], optimizer, gradients(1, 3))
    held = [*optimizer.params, *(p.grad for p in optimizer.params)]
    held += [*optimizer.exp_avgs, *optimizer.exp_avg_sqs]
    assert grid_memory_bytes(3, CLASSES, DIM) == sum(t.numel() * t.element_size() for t in held)
    assert grid_memory_bytes(40, 200, 4096) == 40 * 200 * 4097 * 16  # 524 MB
    assert largest_grid(200, 4096, grid_memory_bytes(7, 200, 4096)) == 7
    assert largest_grid(200, 4096, grid_memory_bytes(7, 200, 4096) - 1) == 6
    assert largest_grid(200, 4096, 1000) == 0


def test_settings_that_do_not_fit_the_rows_are_refused():
    layer = wide_layer(4)
    with pytest.raises(ValueError, match="3 values for 4 heads"):
        Adam([layer.weight, layer.bias], lr=LRS, weight_decay=DECAYS[:3])
    with pytest.raises(ValueError, match="20 rows cannot be split into 3 heads"):
        Adam([layer.weight, layer.bias], lr=LRS[:3])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
def test_on_cuda_each_head_ends_where_its_own_adam_ends_on_the_cpu():
    """CUDA's fused kernel against single-head Adam on the CPU, float32, 200 steps: 1e-5."""
    grads = gradients(200, len(LRS))
    start = wide_layer(len(LRS))
    layer = wide_layer(len(LRS), "cuda")
    optimizer = Adam([layer.weight, layer.bias], lr=LRS, weight_decay=DECAYS)
    apply([layer.weight, layer.bias], optimizer, grads)
    expected = per_head_reference(start, grads, lambda p, lr, d: Adam(p, lr=lr, weight_decay=d))
    for head, alone in enumerate(expected):
        rows = slice(head * CLASSES, (head + 1) * CLASSES)
        torch.testing.assert_close(layer.weight[rows].cpu(), alone.weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias[rows].cpu(), alone.bias, rtol=1e-5, atol=1e-7)
    # Moving devices: the CUDA state continues on the CPU.
    on_cpu = wide_layer(len(LRS))
    on_cpu.load_state_dict(layer.state_dict())
    moved = Adam([on_cpu.weight, on_cpu.bias], lr=LRS, weight_decay=DECAYS)
    moved.load_state_dict(optimizer.state_dict())
    assert moved.exp_avgs[0].device.type == "cpu" and moved.steps[0].item() == 200


@pytest.mark.cuda
@cuda
def test_a_wide_step_captured_in_a_cuda_graph_replays_as_eager_steps():
    """CUDA float32: 20 replays of the captured step against 20 eager steps, exactly."""
    grads = gradients(1, len(LRS))
    eager, graphed = wide_layer(len(LRS), "cuda"), wide_layer(len(LRS), "cuda")
    eager_adam = Adam([eager.weight, eager.bias], lr=LRS, weight_decay=DECAYS)
    apply([eager.weight, eager.bias], eager_adam, grads * 20)
    graphed.weight.grad, graphed.bias.grad = (g.cuda() for g in grads[0])
    adam = Adam([graphed.weight, graphed.bias], lr=LRS, weight_decay=DECAYS)
    # Capture on a side stream after a warm-up step, which is then undone.
    saved = [t.detach().clone() for t in (graphed.weight, graphed.bias)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam.step()
    torch.cuda.current_stream().wait_stream(side)
    adam = Adam([graphed.weight, graphed.bias], lr=LRS, weight_decay=DECAYS)
    with torch.no_grad():
        graphed.weight.copy_(saved[0])
        graphed.bias.copy_(saved[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adam.step()
    with torch.no_grad():  # capturing ran nothing, but reset anyway: 20 replays from the start
        graphed.weight.copy_(saved[0])
        graphed.bias.copy_(saved[1])
        for tensor in (*adam.exp_avgs, *adam.exp_avg_sqs, *adam.steps):
            tensor.zero_()
    for _ in range(20):
        graph.replay()
    torch.testing.assert_close(graphed.state_dict(), eager.state_dict(), rtol=0, atol=0)
    assert adam.steps[0].item() == 20
