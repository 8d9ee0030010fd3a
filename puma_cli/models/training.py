"""Training a classifier by its recipe (`recipe.TrainRecipe`): Adam, AdamW or SGD on the
mean cross-entropy, seeded. `retrain` re-runs it as recorded; for a model trained elsewhere
(`puma import`) it is the recipe its user declares."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError
from puma_cli.models.architectures import (
    Architecture,
    Classifier,
)
from puma_cli.models.augment import (
    augment_batch,
    lr_scheduler,
    mix_batch,
)
from puma_cli.models.predict import as_tensor
from puma_cli.models.recipe import TrainRecipe, architecture_for, check_trainable
from puma_cli.models.user import check_logits

SGD_MOMENTUM = 0.9

Progress = Callable[[int, int, float], None]
"""Called after each epoch with (epoch, epochs, mean training loss)."""


STANDARDIZED_HINT = (
    " (standardised: for a net that takes the values as they are, token ids say, train "
    "with --no-standardize)"
)

StepHook = Callable[[torch.Tensor, torch.Tensor], None]
"""Called after each optimiser step with (batch row positions, parameter update)."""


def train_classifier(
    dataset: Dataset,
    recipe: TrainRecipe,
    n_classes: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    *,
    group: np.ndarray | None = None,
    on_step: StepHook | None = None,
) -> Classifier:
    """Fit a fresh Classifier on every row of `dataset`. Same seed and data, same weights.

    group: row positions to train in as few batches as possible each epoch (the paper's
    ordered scenario). on_step: receives every batch and its parameter update (Amnesiac).
    """
    check_trainable(dataset, recipe)
    torch.manual_seed(recipe.seed)
    model = Classifier(architecture_for(recipe, dataset, n_classes)).to(device)
    X = as_tensor(dataset.X, torch.float32, device)
    if recipe.standardize:
        model.fit_standardisation(X)
    else:
        model.fix_standardisation(*recipe.fixed_inputs())
    hint = STANDARDIZED_HINT if recipe.standardize else ""
    check_logits(model, X[:2], n_classes, model.arch.label, hint)
    del X  # `fit` takes its own copy: one float32 copy of the data at a time, not two
    fit(model, dataset, recipe, recipe.epochs, recipe.seed, device, progress, group, on_step)
    return model


def fit(
    model: Classifier,
    dataset: Dataset,
    recipe: TrainRecipe,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    group: np.ndarray | None = None,
    on_step: StepHook | None = None,
) -> Classifier:
    """Run the recipe's Adam on `model` for `epochs` over `dataset`, from a fresh optimiser."""
    X = as_tensor(dataset.X, torch.float32, device)
    y = torch.as_tensor(dataset.y, dtype=torch.long, device=device)
    optimizer = make_optimizer(model, recipe)
    schedule = lr_scheduler(optimizer, recipe.lr_schedule, epochs, recipe.lr_warmup_epochs)
    generator = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    grouped = None
    if group is not None and group.size:
        grouped = np.zeros(n, dtype=bool)
        grouped[group] = True
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.mixed_precision
    )
    model.train()
    for epoch in range(epochs):
        order = _epoch_order(n, recipe.batch_size, generator, grouped).to(device)
        total = 0.0
        for start, stop in batch_bounds(n, recipe.batch_size):
            batch = order[start:stop]
            before = parameters_to_vector(model.parameters()).detach() if on_step else None
            inputs = augment_batch(X[batch], recipe.augment, generator)
            partner, lam = None, 1.0
            if recipe.mixes:
                inputs, partner, lam = mix_batch(inputs, recipe.mixup, recipe.cutmix, generator)
            with autocast:
                logits = train_forward(model, inputs)
                if logits.ndim != 2 or logits.shape[0] != batch.numel():
                    raise PumaError(
                        f"the network returned {tuple(logits.shape)} for a batch of "
                        f"{batch.numel()} rows in training; it must return logits (n, K) "
                        "for any n (does its forward fix a batch size?)"
                    )
                loss = recipe.loss(logits, y[batch])
                if partner is not None:  # the loss is linear in the target: mix the two
                    loss = lam * loss + (1 - lam) * recipe.loss(logits, y[batch][partner])
            optimizer_step(model, optimizer, loss, recipe)
            if on_step is not None and before is not None:
                on_step(batch, parameters_to_vector(model.parameters()).detach() - before)
            total += float(loss.detach()) * batch.numel()
        if not np.isfinite(total):
            raise PumaError(f"training diverged at epoch {epoch + 1} (loss is {total}); lower --lr")
        if schedule is not None:
            schedule.step()
        if progress is not None:
            progress(epoch + 1, epochs, total / n)
    return model.eval()


def batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of `size` over n rows in order; a last batch of one row
    joins the one before it (BatchNorm cannot normalise one row in training mode), so
    every row is still trained on in every epoch."""
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def train_forward(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """model(X) in training mode; for a batch of one row (one marked row alone) the
    BatchNorm layers use their running statistics, since torch cannot normalise a single
    row by its own (it raises). A network whose training-mode output is not its logits
    (GoogLeNet's and Inception's auxiliary heads: a tuple) is refused, naming the fix."""
    norms = []
    if X.shape[0] == 1:
        norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
    for m in norms:
        m.eval()
    try:
        out = model(X)
    finally:
        for m in norms:
            m.train()
    if not isinstance(out, torch.Tensor):
        arch = getattr(model, "arch", None)
        label = arch.label if isinstance(arch, Architecture) else "the network"
        raise PumaError(
            f"{label} returns {type(out).__name__} in training mode (logits in eval mode): puma "
            "trains on the logits alone (retraining, SISA and shadow models re-run that "
            "recipe) and has no loss for an auxiliary head; return the logits in training "
            "mode too"
        )
    return out


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, recipe: TrainRecipe
) -> None:
    """One step of the recipe's optimiser on `loss`, the gradient's norm clipped to the
    recipe's `clip_grad_norm` first where it sets one."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.clip_grad_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
    optimizer.step()


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over the model's parameters, fresh."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=SGD_MOMENTUM,
            weight_decay=recipe.weight_decay,
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


def _epoch_order(
    n: int, batch_size: int, generator: torch.Generator, grouped: np.ndarray | None
) -> torch.Tensor:
    """A random order of the rows; grouped rows kept together, starting on a batch boundary
    chosen at random, so they fill as few batches as they can."""
    order = torch.randperm(n, generator=generator)
    if grouped is None:
        return order
    inside = torch.from_numpy(grouped)[order]
    others, group = order[~inside], order[inside]
    slots = others.numel() // batch_size + 1
    at = batch_size * int(torch.randint(slots, (1,), generator=generator))
    return torch.cat([others[:at], group, others[at:]])
