"""Predictions and the figures `puma eval` reports: accuracy, mean loss, ECE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.calibration import expected_calibration_error
from puma_cli.data import Dataset


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    ece: float
    n: int


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


def evaluate(model: torch.nn.Module, dataset: Dataset, bins: int = 15) -> Evaluation:
    """Accuracy, mean cross-entropy and ECE (`bins` equal-width bins) of the model on a dataset."""
    logits = predict_logits(model, dataset.X)
    labels = torch.as_tensor(dataset.y)
    loss = float(F.cross_entropy(logits.double(), labels).item())
    probs = torch.softmax(logits.double(), dim=1).numpy()
    accuracy = float((probs.argmax(axis=1) == dataset.y).mean())
    ece = expected_calibration_error(probs, dataset.y, bins)
    return Evaluation(accuracy=accuracy, loss=loss, ece=ece, n=len(dataset))
