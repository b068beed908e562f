"""The `--device auto|cpu|cuda` choice shared by every command.

Kept apart from the extraction runner so that `head` can read it without importing the image
pipeline (and torchvision with it).
"""

from __future__ import annotations

import torch

from extract.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for a missing GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)
