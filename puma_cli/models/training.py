"""The training recipe: Adam (or SGD) on mean cross-entropy, seeded. `retrain` re-runs it as
recorded; for a model trained elsewhere (`puma import`) it is the recipe its user declares."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from puma_cli.data.dataset import Dataset
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    IMAGE_ARCHITECTURES,
    Architecture,
    Classifier,
)
from puma_cli.models.augment import (
    AUGMENTS,
    LR_SCHEDULES,
    augment_batch,
    lr_scheduler,
    mix_batch,
)
from puma_cli.models.predict import as_tensor
from puma_cli.models.user import UserSource, check_logits

OPTIMIZERS = ("adam", "adamw", "sgd")
NO_TRANSFORM = (1.0, (), ())  # TrainRecipe.fixed_inputs() where none was declared
SGD_MOMENTUM = 0.9

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
    shards: int = 1
    slices: int = 1
    optimizer: str = "adam"  # "adamw" (decoupled weight decay) or "sgd" (momentum 0.9)
    standardize: bool = True  # fit per-feature mean/std first; off for imported weights
    arch_args: dict[str, Any] = field(default_factory=dict)  # --arch-args
    arch_source: UserSource | None = None  # arch "user": FILE.py:Class, with its sha256
    # bfloat16 autocast for training's forward passes (weights, optimiser state and
    # gradients stay float32; no loss scaling is needed at bfloat16's range). Recorded,
    # so retraining, SISA and shadow models train the same way; derivatives never use it.
    mixed_precision: bool = False
    # Random flips and crops of each image batch, and the learning rate's schedule
    # (`models.augment`): the CIFAR recipe trains with both; a retrain without them is
    # not the retrain of such a model.
    augment: str = "none"
    lr_schedule: str = "constant"
    lr_warmup_epochs: int = 0  # a linear rise over these epochs first (`lr_scheduler`)
    clip_grad_norm: float = 0.0  # each step's gradient scaled to this norm at most; 0: off
    # The transform imported weights were trained behind, fixed in place of a fitted
    # standardisation (`puma import --input-divisor --normalize-mean --normalize-std`):
    # the net sees (x / input_divisor - mean) / std, so retraining and shadow models see
    # the data as the imported weights did. The defaults give the values as they are.
    input_divisor: float = 1.0
    normalize_mean: tuple[float, ...] = ()
    normalize_std: tuple[float, ...] = ()
    # Cross-entropy against (1 - s) x the label + s / K on every class (torch's
    # label_smoothing): the loss the weights minimise, so the engine differentiates it too.
    label_smoothing: float = 0.0
    # Each batch's rows mixed with partner rows (`augment.mix_batch`): mixup's and CutMix's
    # Beta alpha, 0 for off. The loss then pairs rows, which no per-row derivative holds:
    # the engine differentiates each row's own loss, and removal says so.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Each class's weight in the cross-entropy (torch's `weight`: a batch's loss is the
    # weighted mean over its rows), one a class in label order; () for none. Resolved
    # from `--class-weight balanced` on the trained rows and recorded as numbers, so that
    # retraining minimises the loss the weights did, and the engine differentiates it.
    class_weights: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "hidden": list(self.hidden)}
        for key in ("normalize_mean", "normalize_std", "class_weights"):
            data[key] = list(data[key])
        # The transform is recorded where one was declared: a recipe without one keeps
        # the dict (and its shadow models' cache keys) it had before the fields existed.
        if self.fixed_inputs() == NO_TRANSFORM:
            for key in ("input_divisor", "normalize_mean", "normalize_std"):
                del data[key]
        for key in (
            "label_smoothing", "lr_warmup_epochs", "clip_grad_norm", "mixup", "cutmix",
            "class_weights",
        ):  # fmt: skip
            if not data[key]:  # as where they were asked for: recorded only then
                del data[key]
        data["arch_source"] = self.arch_source.to_dict() if self.arch_source else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["hidden"] = tuple(fields.get("hidden", (64, 32)))
        for key in ("normalize_mean", "normalize_std", "class_weights"):
            fields[key] = tuple(fields.get(key) or ())
        fields["arch_args"] = dict(fields.get("arch_args") or {})
        source = fields.get("arch_source")
        fields["arch_source"] = UserSource.from_dict(source) if source else None
        return cls(**fields)

    def validate(self) -> None:
        if self.epochs < 1:
            raise PumaError(f"--epochs {self.epochs}: train for at least 1 epoch")
        require_range("--lr", self.lr, 0, low_open=True)
        require_range("--weight-decay", self.weight_decay, 0)
        require_range("--label-smoothing", self.label_smoothing, 0, 1, high_open=True)
        require_range("--clip-grad-norm", self.clip_grad_norm, 0)
        require_range("--mixup", self.mixup, 0)
        require_range("--cutmix", self.cutmix, 0)
        require_range("--seed", self.seed, 0, SEED_MAX)
        if self.batch_size < 1:
            raise PumaError(f"--batch-size {self.batch_size}: give 1 or more")
        if self.weight_decay < 0:
            raise PumaError(f"--weight-decay {self.weight_decay} is negative; give 0 or more")
        if self.activation not in ACTIVATIONS:
            raise PumaError(f"--activation {self.activation!r}: choose relu or sigmoid")
        if self.hidden and min(self.hidden) < 1:
            raise PumaError("--hidden needs positive widths, like 64,32 (or none)")
        if self.shards < 1 or self.slices < 1:
            raise PumaError("--shards and --slices take 1 or more")
        if self.lr_warmup_epochs < 0:
            raise PumaError(f"--lr-warmup-epochs {self.lr_warmup_epochs}: give 0 or more")
        if self.lr_warmup_epochs >= self.epochs:
            raise PumaError(
                f"--lr-warmup-epochs {self.lr_warmup_epochs} leaves none of the {self.epochs} "
                "epochs at the full rate; give fewer warmup epochs than --epochs"
            )
        if self.slices > self.epochs:
            raise PumaError(
                f"--slices {self.slices} needs at least as many --epochs (each slice trains "
                f"ceil(epochs / slices) epochs); give --epochs {self.slices} or more"
            )
        self._validate_inputs()
        if not all(math.isfinite(w) and w > 0 for w in self.class_weights):
            raise PumaError(
                f"--class-weight {_listed(self.class_weights)}: give positive numbers, one a "
                "class, or balanced"
            )
        if self.arch == "cnn" and not self.hidden:
            raise PumaError("--arch cnn needs a hidden width, like --hidden 64")
        if self.optimizer not in OPTIMIZERS:
            raise PumaError(f"--optimizer {self.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
        if self.augment not in AUGMENTS:
            raise PumaError(f"--augment {self.augment!r}: choose {', '.join(AUGMENTS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PumaError(f"--lr-schedule {self.lr_schedule!r}: choose {', '.join(LR_SCHEDULES)}")
        if self.arch_args and self.arch in ("mlp", "cnn"):
            raise PumaError(
                f"--arch-args is for resnet18, densenet and FILE.py:Class; --arch {self.arch} "
                "takes --hidden and --activation"
            )
        if self.arch == "user" and self.arch_source is None:
            raise PumaError("a user architecture is given as --arch FILE.py:ClassName")
        if self.arch not in (*ARCHITECTURES, "user"):
            raise PumaError(
                f"--arch {self.arch!r}: choose {', '.join(ARCHITECTURES)} or FILE.py:ClassName"
            )

    def _validate_inputs(self) -> None:
        divisor, mean, std = self.input_divisor, self.normalize_mean, self.normalize_std
        if not (math.isfinite(divisor) and divisor > 0):
            raise PumaError(
                f"--input-divisor {divisor:g}: give a positive number, like 255 for 8-bit "
                "images the network saw through torchvision's ToTensor"
            )
        if bool(mean) != bool(std):
            raise PumaError(
                "--normalize-mean and --normalize-std go together, as torchvision's "
                "Normalize(mean, std) takes them: give both, or neither"
            )
        if not all(math.isfinite(m) for m in mean):
            raise PumaError(f"--normalize-mean {_listed(mean)}: give finite numbers")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise PumaError(f"--normalize-std {_listed(std)}: give positive numbers")
        if self.standardize and (divisor != 1 or mean):
            raise PumaError(
                "a fixed input transform (--input-divisor, --normalize-mean/std) takes the "
                "place of the fitted standardisation; the recipe cannot have both"
            )

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss: cross-entropy, label-smoothed and class-weighted where the
        recipe is (a weighted mean over the batch's rows, as torch's `weight` takes it)."""
        weight = None
        if self.class_weights:
            weight = _class_weight_tensor(self.class_weights, logits.dtype, logits.device)
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=self.label_smoothing)

    def with_class_weights(self, spec: str, y: np.ndarray, n_classes: int) -> TrainRecipe:
        """The recipe with `--class-weight`'s weights: `balanced` (scikit-learn's:
        n / (K x the class's count) over the rows `y` it trains on), or one number a class
        in label order, comma-separated; empty: none."""
        text = spec.strip()
        if not text:
            return self
        if text.lower() == "balanced":
            counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
            if not counts.all():
                missing = int(np.flatnonzero(counts == 0)[0])
                raise PumaError(
                    f"--class-weight balanced: class {missing} has no trained row to weigh; "
                    "give the weights as numbers, one a class"
                )
            weights = tuple(float(w) for w in len(y) / (n_classes * counts))
        else:
            try:
                weights = tuple(float(part) for part in text.strip("[]() ").split(",") if part)
            except ValueError:
                raise PumaError(
                    f"--class-weight {text!r}: give balanced, or numbers separated by commas, "
                    "one a class in label order, like 1,5"
                ) from None
        if len(weights) != n_classes:
            raise PumaError(
                f"--class-weight gives {len(weights)} weights for {n_classes} classes; give one "
                "a class, in label order (or the class names' sorted order), or balanced"
            )
        recipe = replace(self, class_weights=weights)
        recipe.validate()
        return recipe

    @property
    def mixes(self) -> bool:
        """Whether training mixes pairs of rows (`--mixup`, `--cutmix`)."""
        return self.mixup > 0 or self.cutmix > 0

    def fixed_inputs(self) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
        """`Classifier.fix_standardisation`'s arguments."""
        return self.input_divisor, self.normalize_mean, self.normalize_std


@functools.lru_cache(maxsize=8)
def _class_weight_tensor(
    weights: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The class weights as a tensor, made once per dtype and device rather than copied
    to a GPU at every step."""
    return torch.tensor(weights, dtype=dtype, device=device)


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def architecture_for(
    recipe: TrainRecipe, dataset: Dataset, n_classes: int, shards: int = 1
) -> Architecture:
    """The architecture a new model of `recipe` on `dataset` gets (train, import)."""
    shape = dataset.input_shape
    if recipe.arch in IMAGE_ARCHITECTURES and len(shape) == 3:
        channels, height, width = shape
        if width in (1, 3, 4) and channels not in (1, 3, 4):  # numpy, PIL and TF's layout
            raise PumaError(
                f"--arch {recipe.arch} takes images as (n, C, H, W), and this data's rows are "
                f"({channels}, {height}, {width}), which looks channels-last (n, H, W, C): "
                "save X.transpose(0, 3, 1, 2) in the NPZ"
            )
    return Architecture(
        name=recipe.arch,
        input_shape=shape,
        n_classes=n_classes,
        hidden=recipe.hidden,
        activation=recipe.activation,
        shards=shards,
        args=dict(recipe.arch_args),
        source=recipe.arch_source,
    )


def check_trainable(dataset: Dataset, recipe: TrainRecipe) -> None:
    """Refuse a bad recipe, or data a classifier cannot be trained on."""
    recipe.validate()
    if np.unique(dataset.y).size < 2:
        raise PumaError(f"{dataset.name} holds one class only; a classifier needs two or more")
    if len(dataset.input_shape) != 3:  # not images: what only images take is refused
        shape = "x".join(map(str, dataset.input_shape))
        if recipe.augment != "none":
            raise PumaError(
                f"--augment {recipe.augment} flips and crops images (n, C, H, W), and the rows "
                f"of {dataset.name} are {shape}; give --augment none"
            )
        if recipe.cutmix > 0:
            raise PumaError(
                f"--cutmix pastes a box of one image (n, C, H, W) over another, and the rows "
                f"of {dataset.name} are {shape}; give --mixup, which blends rows of any shape"
            )


def mixing_warnings(dataset: Dataset, recipe: TrainRecipe) -> list[str]:
    """A warning where mixup blends rows of whole numbers taken as they are: token ids (an
    nn.Embedding's input) blended are no ids, and a net that casts them reads others. The
    data cannot tell ids from counts or pixel values, so this warns and does not refuse;
    images (n, C, H, W) blend as pictures and are not warned of."""
    if (
        recipe.mixup <= 0
        or recipe.standardize
        or len(dataset.input_shape) == 3
        or not np.issubdtype(dataset.X.dtype, np.integer)
    ):
        return []
    return [
        f"--mixup blends the values of two rows, and the rows of {dataset.name} are whole "
        "numbers taken as they are: if they are ids (an nn.Embedding's input), a blend is no "
        "id and the net reads another (x.long() truncates it); train without --mixup. "
        "Counts blend fine."
    ]


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


def loss_weight_decay(recipe: Mapping[str, Any]) -> float:
    """The L2 coefficient a recorded recipe's weight decay adds to the training loss.

    Adam's and SGD's weight decay is the gradient of decay / 2 * |theta|^2, a term of the
    loss the weights minimise, so the engine's Hessian carries it; AdamW's decoupled decay
    shrinks the weights beside the loss, not through it, and adds none."""
    if recipe.get("optimizer") == "adamw":
        return 0.0
    return float(recipe.get("weight_decay", 0.0))


def mixing_notes(recipe: Mapping[str, Any]) -> list[str]:
    """What a removal says of a recorded recipe that mixes rows (`--mixup`, `--cutmix`):
    its loss pairs rows, which no row's own derivative holds."""
    mixed = [f"{key} (alpha {recipe[key]:g})" for key in ("mixup", "cutmix") if recipe.get(key)]
    if not mixed:
        return []
    return [
        f"the model was trained with {' and '.join(mixed)}, whose loss blends pairs of "
        "rows: the engine differentiates each row's own cross-entropy instead, so the patch "
        "takes out a row's own term and not its share of the blends; check the removal "
        "with `puma attack` or `puma compare` (retraining re-runs the mixing)"
    ]


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
