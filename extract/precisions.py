"""The compute precisions, named once: what each name computes in, and which names each command
takes. `extract` runs the backbone in any of them; `head.train` offers fp32 and bf16 (the
weights and Adam's state stay float32 either way) and so does `live`.

Kept apart from the extraction runner so that `head` and `live` can read it without importing
the image pipeline.
"""

from __future__ import annotations

import torch

from extract.errors import Option, UserError

DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,  # float32 tensors; CUDA matmuls and convolutions in TensorFloat-32
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
EXTRACT_CHOICES = ("auto", *DTYPES)
HEAD_CHOICES = ("fp32", "bf16")
LIVE_CHOICES = ("fp32", "bf16")
LIVE_DEFAULT = LIVE_CHOICES[0]  # live's --precision and its Python API's


def checked(name: str, choices: tuple[str, ...]) -> str:
    """`name` if the command takes it, else the one-line error its --precision flag gives."""
    if name not in choices:
        raise UserError(Option("precision", name), f": choose from {', '.join(choices)}")
    return name


def resolve(name: str, device: torch.device) -> str:
    """Extraction's `auto`: fp32 on the CPU and tf32 on CUDA (full-range float32 inputs, fast
    matmuls)."""
    if checked(name, EXTRACT_CHOICES) == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    return name


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
