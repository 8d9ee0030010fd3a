"""--device auto|cpu|cuda."""

from __future__ import annotations

import torch

from puma_cli.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when this machine has it, else cpu; 'cuda' without a GPU is an error."""
    if name not in DEVICES:
        raise DeviceError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this machine has no usable CUDA GPU; use --device cpu")
    return torch.device(name)
