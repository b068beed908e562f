"""The precision names: one table, and each command takes only the names it supports."""

from __future__ import annotations

import pytest
import torch

from extract.errors import UserError
from extract.precisions import DTYPES, HEAD_CHOICES, LIVE_CHOICES, checked, resolve


def test_auto_is_fp32_on_the_cpu_and_tf32_on_cuda():
    assert resolve("auto", torch.device("cpu")) == "fp32"
    assert resolve("auto", torch.device("cuda")) == "tf32"
    assert resolve("bf16", torch.device("cpu")) == "bf16"


def test_head_and_live_take_only_fp32_and_bf16():
    assert set(HEAD_CHOICES) == set(LIVE_CHOICES) == {"fp32", "bf16"} < set(DTYPES)
    for name in ("tf32", "fp16", "auto", "float32"):
        with pytest.raises(UserError) as raised:
            checked(name, LIVE_CHOICES)
        assert raised.value.for_command() == f"--precision {name}: choose from fp32, bf16"
    with pytest.raises(UserError, match="precision='half'"):
        resolve("half", torch.device("cpu"))
