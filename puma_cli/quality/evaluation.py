"""Predictions and the figures `puma eval` reports: accuracy, mean loss, ECE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from puma_cli.data.dataset import Dataset
from puma_cli.models.predict import predict_logits
from puma_cli.quality.calibration import expected_calibration_error


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    ece: float
    n: int


def evaluate(model: torch.nn.Module, dataset: Dataset, bins: int = 15) -> Evaluation:
    """Accuracy, mean cross-entropy and ECE (`bins` equal-width bins) of the model on a dataset."""
    logits = predict_logits(model, dataset.X)
    labels = torch.as_tensor(dataset.y)
    loss = float(F.cross_entropy(logits.double(), labels).item())
    probs = torch.softmax(logits.double(), dim=1).numpy()
    accuracy = float((probs.argmax(axis=1) == dataset.y).mean())
    ece = expected_calibration_error(probs, dataset.y, bins)
    return Evaluation(accuracy=accuracy, loss=loss, ece=ece, n=len(dataset))
