"""The head's Adam against torch.optim.Adam: same steps, same state_dict, none of its imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import REPO
from head.adam import Adam


def problem(seed: int = 0) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small linear classifier and a few batches of ReLU-like features."""
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.rand(16, 64, generator=generator).clamp_min(0.4) - 0.4,
            torch.randint(0, 5, (16,), generator=generator),
        )
        for _ in range(12)
    ]
    torch.manual_seed(seed)
    return nn.Linear(64, 5), batches


def train(layer: nn.Linear, optimizer, batches) -> None:
    for features, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(layer(features), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_steps_equal_torch_fused_adam_exactly_and_plain_adam_closely(weight_decay):
    ours, batches = problem()
    fused, _ = problem()
    plain, _ = problem()
    train(ours, Adam([ours.weight, ours.bias], lr=1e-2, weight_decay=weight_decay), batches)
    train(
        fused,
        torch.optim.Adam(fused.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True),
        batches,
    )
    train(plain, torch.optim.Adam(plain.parameters(), lr=1e-2, weight_decay=weight_decay), batches)
    assert not torch.equal(ours.weight, problem()[0].weight), "the weights moved"
    torch.testing.assert_close(ours.state_dict(), fused.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(ours.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)


def moments(optimizer) -> dict[str, list[torch.Tensor]]:
    """step, exp_avg and exp_avg_sq of each parameter, from either optimizer's state_dict."""
    state = optimizer.state_dict()["state"]
    return {
        name: [torch.as_tensor(state[index][name]) for index in sorted(state)]
        for name in ("step", "exp_avg", "exp_avg_sq")
    }


def assert_same_moments(a, b) -> None:
    got, expected = moments(a), moments(b)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_state_dict_moves_both_ways_between_ours_and_torch():
    """Ours -> torch.optim.Adam and back: step counts and both moments arrive equal, and the
    steps taken after loading move the weights exactly as the other optimizer would have."""
    ours, batches = problem()
    theirs, _ = problem()
    optimizer = Adam([ours.weight, ours.bias], lr=1e-2)
    train(ours, optimizer, batches[:6])
    theirs.load_state_dict(ours.state_dict())
    torch_adam = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)
    torch_adam.load_state_dict(optimizer.state_dict())
    assert_same_moments(torch_adam, optimizer)
    assert moments(torch_adam)["exp_avg"][0].abs().min() > 0, "the moments are not still zero"
    train(ours, optimizer, batches[6:])
    train(theirs, torch_adam, batches[6:])
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    assert_same_moments(torch_adam, optimizer)

    back, _ = problem()
    back.load_state_dict(theirs.state_dict())
    again = Adam([back.weight, back.bias], lr=1e-2)
    again.load_state_dict(torch_adam.state_dict())
    assert again.steps[0].item() == 12
    assert_same_moments(again, torch_adam)
    train(back, again, batches[:3])
    train(theirs, torch_adam, batches[:3])
    assert again.steps[0].item() == 15
    torch.testing.assert_close(back.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    assert_same_moments(again, torch_adam)


def test_training_imports_neither_the_compiler_stack_nor_torchvision(features_file, tmp_path):
    """What keeps head.train's memory down: torch.optim pulls in TorchDynamo, extract the
    image pipeline. A fresh process trains, then lists what it loaded."""
    code = (
        "import sys; from head.train import main; "
        f"code = main(['--features', {str(features_file)!r}, '--save', "
        f"{str(tmp_path / 'run')!r}, '--epochs', '2', '--device', 'cpu']); "
        "print(code, [m for m in ('torch._dynamo', 'sympy', 'torchvision') "
        "if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "run" / "last.pt").is_file()
