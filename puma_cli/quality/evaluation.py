"""Predictions and the figures `puma eval` reports: accuracy, mean loss, ECE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.data.dataset import Dataset
from puma_cli.models.predict import Tell, offset_teller, predict_logits
from puma_cli.quality.calibration import expected_calibration_error

NEAR_CHANCE = 0.1  # accuracy within this of the largest class's share: near chance


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    ece: float
    n: int


def evaluate(
    model: torch.nn.Module, dataset: Dataset, bins: int = 15, tell: Tell | None = None
) -> Evaluation:
    """Accuracy, mean cross-entropy and ECE (`bins` equal-width bins) of the model on a
    dataset; `tell` hears the rows predicted after each batch."""
    logits = predict_logits(model, dataset.X, tell=tell)
    labels = torch.as_tensor(dataset.y)
    loss = float(F.cross_entropy(logits.double(), labels).item())
    probs = torch.softmax(logits.double(), dim=1).numpy()
    accuracy = float((probs.argmax(axis=1) == dataset.y).mean())
    ece = expected_calibration_error(probs, dataset.y, bins)
    return Evaluation(accuracy=accuracy, loss=loss, ece=ece, n=len(dataset))


def evaluate_each(
    model: torch.nn.Module, datasets: Sequence[Dataset], tell: Tell | None = None
) -> list[Evaluation]:
    """`evaluate` on each dataset, told as one pass: the rows predicted so far over the
    rows of them all."""
    total = sum(len(d) for d in datasets)
    done = 0
    out = []
    for dataset in datasets:
        step = None if tell is None else offset_teller(tell, done, total)
        out.append(evaluate(model, dataset, tell=step))
        done += len(dataset)
    return out


def near_chance(accuracy: float, y: np.ndarray, n_classes: int) -> float | None:
    """The largest class's share of the rows `y` when `accuracy` on them is within
    NEAR_CHANCE of it (a model that learnt next to nothing from them), else None. On
    rows nearly all of one class the margin is half the room above that share, so a
    model that gets 99.5 % of a 99 %-majority set right is not taken for a constant."""
    majority = float(np.bincount(y, minlength=n_classes).max() / max(len(y), 1))
    margin = min(NEAR_CHANCE, (1 - majority) / 2)
    return majority if accuracy < majority + margin else None
