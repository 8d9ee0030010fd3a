"""The approximate baselines today's unlearning papers compare against, all by training
the model on for a few epochs (the recorded recipe's optimiser, learning rate and batch
size unless `--lr` says otherwise; `--epochs` defaults to a tenth of its epochs):

- finetune: plain training on the remaining rows (catastrophic forgetting of the marked
  ones; Warnecke et al. 2023 and every benchmark since).
- neggrad: NegGrad+ (Kurmanji et al. 2023): each step descends alpha x the loss on a
  batch of remaining rows and ascends (1 - alpha) x the loss on a batch of marked rows.
- random-labels: training on the remaining rows and the marked rows with labels drawn at
  random among the other classes (Golatkar et al. 2020; Graves et al. 2021's relabelling).
- salun: SalUn (Fan et al. 2024): the gradient of the marked rows' loss picks the most
  salient share of the weights (`--mask-share`, 0.5 as in the paper), then random-labels
  training moves those weights only; the others keep their exact values.
- scrub: SCRUB (Kurmanji et al. 2023): a student, initialised at the model, is distilled
  from the original (the teacher) on the remaining rows (min steps: gamma x cross-entropy
  + alpha x KL, at temperature 4) and pushed away from it on the marked rows (max steps:
  - KL), the max steps in the first half of the epochs only, the paper's schedule.

Each is seeded by `--seed` (batch order, random labels, the recipe's flips and crops
where it augments): the same seed gives the same bytes on the CPU. Batches of marked
rows are cycled alongside the remaining rows' ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.errors import PumaError
from puma_cli.io.checkpoint import single_model
from puma_cli.models.architectures import Classifier
from puma_cli.models.augment import augment_batch
from puma_cli.models.predict import as_tensor
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.training import batch_bounds, make_optimizer, optimizer_step, train_forward
from puma_cli.unlearn import RemovalRequest, RemovalResult, register

Tensor = torch.Tensor
EPOCH_SHARE = 10  # default epochs: the recipe's over this, at least 1
SCRUB_TEMPERATURE = 4.0
SCRUB_GAMMA = 0.99  # cross-entropy weight on the min steps
SCRUB_ALPHA = 0.001  # KL weight on the min steps (the paper's CIFAR setting)


@dataclass
class Tuning:
    """What every baseline starts from: a trainable copy, its data and its schedule."""

    model: Classifier
    recipe: TrainRecipe
    epochs: int
    lr: float
    X: Tensor
    y: Tensor
    remaining: Tensor  # positions into X
    marked: Tensor
    n_classes: int
    generator: torch.Generator

    def batches(self, rows: Tensor) -> list[Tensor]:
        order = rows[torch.randperm(rows.numel(), generator=self.generator)]
        return [order[a:b] for a, b in batch_bounds(order.numel(), self.recipe.batch_size)]

    def inputs(self, rows: Tensor) -> Tensor:
        """These rows' inputs as the recipe trains on them: flipped and cropped at random
        where it augments (`models.augment`), as the literature's baselines tune on the
        training's own augmented batches."""
        return augment_batch(self.X[rows], self.recipe.augment, self.generator)

    def forward(self, rows: Tensor) -> Tensor:
        """The model's logits on these rows' inputs, in training mode (`train_forward`)."""
        return train_forward(self.model, self.inputs(rows))

    def optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, replace(self.recipe, lr=self.lr))

    def parameters(self, method: str) -> dict[str, object]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "optimizer": self.recipe.optimizer,
            "batch_size": self.recipe.batch_size,
            "method": method,
        }


def _tuning(request: RemovalRequest, method: str) -> Tuning:
    original = single_model(request.checkpoint, f"--method {method}")
    recipe = TrainRecipe.from_dict(request.checkpoint.recipe)
    options = request.options
    epochs = options.epochs or max(1, round(recipe.epochs / EPOCH_SHARE))
    lr = options.lr or recipe.lr
    torch.manual_seed(options.seed)
    model = copy.deepcopy(original)
    device = next(model.parameters()).device
    trained = request.trained_rows
    X = as_tensor(request.dataset.X[trained], torch.float32, device)
    y = torch.as_tensor(request.dataset.y[trained], dtype=torch.long, device=device)
    is_marked = np.isin(trained, request.marked)
    return Tuning(
        model=model,
        recipe=recipe,
        epochs=epochs,
        lr=lr,
        X=X,
        y=y,
        remaining=torch.as_tensor(np.flatnonzero(~is_marked), device=device),
        marked=torch.as_tensor(np.flatnonzero(is_marked), device=device),
        n_classes=request.checkpoint.arch.n_classes,
        generator=torch.Generator().manual_seed(options.seed),
    )


def _step(t: Tuning, optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
    """One step of the recipe's optimiser (its clipping too); the loss, refused if not finite."""
    optimizer_step(t.model, optimizer, loss, t.recipe)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise PumaError(f"the fine-tuning loss became {value}; lower --lr (nothing was written)")
    return value


def _report(request: RemovalRequest, epoch: int, epochs: int, loss: float) -> None:
    if request.progress is not None:
        request.progress(epoch, epochs, loss)


def _result(tuning: Tuning, method: str, **extra: object) -> RemovalResult:
    return RemovalResult(
        model=tuning.model.eval(), method=method, parameters={**tuning.parameters(method), **extra}
    )


@register("finetune")
def finetune(request: RemovalRequest) -> RemovalResult:
    t = _tuning(request, "finetune")
    optimizer = t.optimizer()
    t.model.train()
    for epoch in range(t.epochs):
        losses = [
            _step(t, optimizer, t.recipe.loss(t.forward(b), t.y[b])) for b in t.batches(t.remaining)
        ]
        _report(request, epoch + 1, t.epochs, float(np.mean(losses)))
    return _result(t, "finetune")


@register("neggrad")
def neggrad(request: RemovalRequest) -> RemovalResult:
    t = _tuning(request, "neggrad")
    alpha = request.options.neggrad_alpha
    optimizer = t.optimizer()
    t.model.train()
    for epoch in range(t.epochs):
        forget = _Batches(t, t.marked)
        losses = []
        for b in t.batches(t.remaining):
            f = next(forget)
            descent = t.recipe.loss(t.forward(b), t.y[b])
            ascent = t.recipe.loss(t.forward(f), t.y[f])
            losses.append(_step(t, optimizer, alpha * descent - (1 - alpha) * ascent))
        _report(request, epoch + 1, t.epochs, float(np.mean(losses)))
    return _result(t, "neggrad", alpha=alpha)


class _Batches:
    """Batches of `rows`, reshuffled each time they run out."""

    def __init__(self, tuning: Tuning, rows: Tensor) -> None:
        self.tuning, self.rows = tuning, rows
        self.queue: list[Tensor] = []

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Tensor:
        if not self.queue:
            self.queue = self.tuning.batches(self.rows)
        return self.queue.pop(0)


def random_other_labels(y: Tensor, n_classes: int, generator: torch.Generator) -> Tensor:
    """For each label, one of the other n_classes - 1 classes, uniformly."""
    shift = torch.randint(1, n_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % n_classes


def _relabelled_training(
    request: RemovalRequest, t: Tuning, after_step: Callable[[], None] | None = None
) -> None:
    """Train on the remaining rows and the marked rows under random wrong labels."""
    labels = t.y.clone()
    labels[t.marked] = random_other_labels(t.y[t.marked], t.n_classes, t.generator)
    rows = torch.cat([t.remaining, t.marked])
    optimizer = t.optimizer()
    t.model.train()
    for epoch in range(t.epochs):
        losses = []
        for b in t.batches(rows):
            losses.append(_step(t, optimizer, t.recipe.loss(t.forward(b), labels[b])))
            if after_step is not None:
                after_step()
        _report(request, epoch + 1, t.epochs, float(np.mean(losses)))


@register("random-labels")
def random_labels(request: RemovalRequest) -> RemovalResult:
    t = _tuning(request, "random-labels")
    _relabelled_training(request, t)
    return _result(t, "random-labels")


def saliency_mask(model: torch.nn.Module, X: Tensor, y: Tensor, share: float) -> list[Tensor]:
    """Per parameter tensor, True where |d loss_marked / d w| is among the largest `share`
    of all the model's weights (one ranking over the whole model, as in SalUn). Exactly
    that many: ties (a fitted model has many zero gradients) are broken by position."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(X), y), params)
    magnitude = torch.cat([g.abs().reshape(-1) for g in grads])
    keep = max(1, round(share * magnitude.numel()))
    flat = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    flat[torch.topk(magnitude, keep, sorted=False).indices] = True
    return [
        m.view_as(g) for m, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
    ]


@register("salun")
def salun(request: RemovalRequest) -> RemovalResult:
    t = _tuning(request, "salun")
    share = request.options.mask_share
    mask = saliency_mask(t.model, t.X[t.marked], t.y[t.marked], share)
    params = [p for p in t.model.parameters() if p.requires_grad]
    frozen = [p.detach().clone() for p in params]

    def restore() -> None:  # the weights outside the mask keep their exact values
        with torch.no_grad():
            for p, m, original in zip(params, mask, frozen, strict=True):
                p.copy_(torch.where(m, p, original))

    _relabelled_training(request, t, restore)
    salient = int(sum(int(m.sum()) for m in mask))
    return _result(t, "salun", mask_share=share, salient_parameters=salient)


def _kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) at SCRUB's temperature, scaled by T^2 (distillation's form)."""
    T = SCRUB_TEMPERATURE
    return (
        F.kl_div(
            F.log_softmax(student / T, dim=1),
            F.log_softmax(teacher / T, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * T
        * T
    )


@register("scrub")
def scrub(request: RemovalRequest) -> RemovalResult:
    t = _tuning(request, "scrub")
    teacher = copy.deepcopy(t.model).eval()
    max_epochs = max(1, t.epochs // 2)
    optimizer = t.optimizer()
    for epoch in range(t.epochs):
        losses = []
        t.model.train()
        if epoch < max_epochs:  # max steps: move away from the teacher on the marked rows
            for b in t.batches(t.marked):
                x = t.inputs(b)
                with torch.no_grad():
                    target = teacher(x)
                losses.append(_step(t, optimizer, -_kl(train_forward(t.model, x), target)))
        for b in t.batches(t.remaining):  # min steps: stay with it on the remaining rows
            x = t.inputs(b)  # the teacher sees the student's (augmented) batch
            with torch.no_grad():
                target = teacher(x)
            out = train_forward(t.model, x)
            loss = SCRUB_GAMMA * t.recipe.loss(out, t.y[b]) + SCRUB_ALPHA * _kl(out, target)
            losses.append(_step(t, optimizer, loss))
        _report(request, epoch + 1, t.epochs, float(np.mean(losses)))
    return _result(
        t,
        "scrub",
        max_epochs=max_epochs,
        temperature=SCRUB_TEMPERATURE,
        gamma=SCRUB_GAMMA,
        alpha=SCRUB_ALPHA,
    )
