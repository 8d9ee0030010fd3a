"""Predictions in batches, on whatever device the model lives on."""

from __future__ import annotations

import numpy as np
import torch


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(model: torch.nn.Module, X: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """X: (n, *input_shape) -> logits (n, K) float32 on the CPU."""
    device = device_of(model)
    model.eval()
    out = [
        model(torch.as_tensor(X[i : i + batch_size], dtype=torch.float32, device=device)).cpu()
        for i in range(0, X.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)
