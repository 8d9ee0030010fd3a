"""The training recipe: Adam on mean cross-entropy, seeded. `retrain` re-runs it as recorded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.data import Dataset
from puma_cli.errors import PumaError
from puma_cli.models import ACTIVATIONS, Architecture, Classifier

Progress = Callable[[int, int, float], None]
"""Called after each epoch with (epoch, epochs, mean training loss)."""


@dataclass(frozen=True)
class TrainRecipe:
    arch: str = "mlp"
    hidden: tuple[int, ...] = (64, 32)
    activation: str = "relu"
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden), "optimizer": "adam"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["hidden"] = tuple(fields.get("hidden", (64, 32)))
        return cls(**fields)

    def validate(self) -> None:
        if self.epochs < 1:
            raise PumaError(f"--epochs {self.epochs}: train for at least 1 epoch")
        if not self.lr > 0:
            raise PumaError(f"--lr {self.lr}: the learning rate must be positive")
        if self.batch_size < 1:
            raise PumaError(f"--batch-size {self.batch_size}: give 1 or more")
        if self.weight_decay < 0:
            raise PumaError(f"--weight-decay {self.weight_decay} is negative; give 0 or more")
        if self.activation not in ACTIVATIONS:
            raise PumaError(f"--activation {self.activation!r}: choose relu or sigmoid")
        if self.hidden and min(self.hidden) < 1:
            raise PumaError("--hidden needs positive widths, like 64,32 (or none)")
        if self.arch == "cnn" and not self.hidden:
            raise PumaError("--arch cnn needs a hidden width, like --hidden 64")


def architecture_for(recipe: TrainRecipe, dataset: Dataset, n_classes: int) -> Architecture:
    return Architecture(
        name=recipe.arch,
        input_shape=dataset.input_shape,
        n_classes=n_classes,
        hidden=recipe.hidden,
        activation=recipe.activation,
    )


def train_classifier(
    dataset: Dataset,
    recipe: TrainRecipe,
    n_classes: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Classifier:
    """Fit a fresh Classifier on every row of `dataset`. Same seed and data, same weights."""
    recipe.validate()
    present = np.unique(dataset.y)
    if present.size < 2:
        raise PumaError(f"{dataset.name} holds one class only; a classifier needs two or more")
    torch.manual_seed(recipe.seed)
    model = Classifier(architecture_for(recipe, dataset, n_classes)).to(device)
    X = torch.as_tensor(dataset.X, dtype=torch.float32, device=device)
    y = torch.as_tensor(dataset.y, dtype=torch.long, device=device)
    model.fit_standardisation(X)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    n = X.shape[0]
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for start in range(0, n, recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = F.cross_entropy(model(X[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
        if not np.isfinite(total):
            raise PumaError(f"training diverged at epoch {epoch + 1} (loss is {total}); lower --lr")
        if progress is not None:
            progress(epoch + 1, recipe.epochs, total / n)
    return model.eval()
