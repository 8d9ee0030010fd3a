"""The training recipe (`TrainRecipe`): what `train` records with a model, so that
`retrain`, SISA, shadow models and the fine-tuning baselines train the same way; for a
model trained elsewhere (`puma import`), the recipe its user declares. Also what a recipe
refuses before any training (`check_trainable`) and warns of (`mixing_warnings`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.data.dataset import Dataset
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    IMAGE_ARCHITECTURES,
    Architecture,
)
from puma_cli.models.augment import (
    AUGMENTS,
    LR_SCHEDULES,
)
from puma_cli.models.user import UserSource

OPTIMIZERS = ("adam", "adamw", "sgd")
NO_TRANSFORM = (1.0, (), ())  # TrainRecipe.fixed_inputs() where none was declared


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
