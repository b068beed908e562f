"""Where the work runs: the `--device auto|cpu|cuda` choice shared by every command, and the host
memory there is to hold features.

Kept apart from the extraction runner so that `head` can read it without importing the image
pipeline (and torchvision with it).
"""

from __future__ import annotations

import os

import torch

from extract.errors import Option, UserError

DEFAULT_DEVICE = "auto"  # every command's and every API function's default --device


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for a missing GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            Option("device", "cuda"),
            ": no CUDA device is available (use ",
            Option("device", "cpu"),
            ")",
        )
    if name not in ("cpu", "cuda"):
        raise UserError(Option("device", name), ": choose auto, cpu or cuda")
    return torch.device(name)


def available_memory() -> int:
    """Host memory that can be allocated without swapping (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
