"""Predictions in batches, on whatever device the model lives on."""

from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def as_tensor(X: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """X as a tensor of `dtype`: a read-only memory map (an NPZ puma maps) is copied, as
    torch cannot share it; anything else converts as torch.as_tensor does."""
    if isinstance(X, np.ndarray) and not X.flags.writeable:
        X = np.array(X, dtype=_NUMPY.get(dtype, X.dtype))
    return torch.as_tensor(X, dtype=dtype, device=device)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(model: torch.nn.Module, X: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """X: (n, *input_shape) -> logits (n, K) float32 on the CPU."""
    device = device_of(model)
    model.eval()
    out = [
        model(as_tensor(X[i : i + batch_size], torch.float32, device)).cpu()
        for i in range(0, X.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)
