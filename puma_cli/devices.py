"""--device auto|cpu|cuda|cuda:N."""

from __future__ import annotations

import os
import re

import torch

from puma_cli.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when this machine has it, else cpu; 'cuda' without a GPU is an error;
    'cuda:N' is the machine's N-th GPU (outside torchrun, where each process takes the GPU
    of its LOCAL_RANK)."""
    indexed = re.fullmatch(r"cuda:(\d+)", name)
    if indexed:
        return _indexed_gpu(int(indexed.group(1)))
    if name not in DEVICES:
        raise DeviceError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N (a GPU's index)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this machine has no usable CUDA GPU; use --device cpu")
    return torch.device(name)


def _indexed_gpu(index: int) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DeviceError(
            f"--device cuda:{index} under torchrun: give --device cuda, and each process "
            "takes the GPU of its LOCAL_RANK (CUDA_VISIBLE_DEVICES picks which GPUs)"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device cuda:{index}: this machine has no usable CUDA GPU; use --device cpu"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device cuda:{index}: this machine has {count} GPU{'s' if count != 1 else ''} "
            f"(cuda:0..cuda:{count - 1})"
        )
    torch.cuda.set_device(index)  # what library code means by "cuda" from here on
    return torch.device("cuda", index)


def device_memory(device: torch.device) -> int | None:
    """Bytes one process may use on `device`, None where it cannot be told: a GPU's total
    memory; on the CPU the machine's physical memory (or its cgroup's limit, where lower),
    shared among the processes torchrun starts on it (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            text = limit.read().strip()
        if text.isdigit():
            memory = min(memory, int(text))
    except OSError:
        pass
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return memory // (int(local) if local.isdigit() and int(local) > 0 else 1)
