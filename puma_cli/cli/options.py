"""The options several commands share, and the choices that mirror the library's
registries (tests hold them equal), spelled out here so that building the command line
imports no job."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from puma_cli import console
from puma_cli.cli.base import COMMANDS
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.io.config import load_config


def _apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager: load the YAML before other options are read, so its values become defaults."""
    if value is None:
        return value
    options = {p.name for p in ctx.command.params if p.name}
    try:
        defaults = load_config(value, ctx.command.name or "", COMMANDS, options)
    except PumaError as exc:
        console.error(str(exc))
        raise typer.Exit(1) from None
    params = {p.name: p for p in ctx.command.params if p.name}
    default_map = {}
    for key, raw in defaults.items():
        given = ",".join(map(str, raw)) if isinstance(raw, list) else raw
        try:  # a value of the wrong type is the file's fault: exit 1, as for any bad input
            params[key].process_value(ctx, given)
        except (typer.BadParameter, ValueError, TypeError) as exc:
            message = exc.format_message() if isinstance(exc, typer.BadParameter) else exc
            console.error(f"{value}: option '{key.replace('_', '-')}': {message}")
            raise typer.Exit(1) from None
        default_map[key] = given
    ctx.default_map = default_map
    return value


def _seed(value: int) -> int:
    """Every random generator puma uses takes seeds in 0..2**32-1."""
    try:
        require_range("--seed", value, 0, SEED_MAX)
    except PumaError as exc:
        console.error(str(exc))
        raise typer.Exit(1) from None
    return value


# Every Path parameter says readable=False: click would refuse an unreadable file as a
# usage error (exit 2); the readers refuse it as bad input (exit 1), saying how to fix it.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed for every random step (0..2**32-1).", callback=_seed)
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (the N-th GPU).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file of option defaults; flags win.",
        is_eager=True,
        callback=_apply_config,
        readable=False,
    ),
]
LabelColOpt = Annotated[str, typer.Option("--label-col", help="Name of the label column.")]
IdColOpt = Annotated[str, typer.Option("--id-col", help="Name of the id column, if any.")]


# The choices below mirror the library's registries (tests hold them equal); they are
# spelled out here so that building the command line imports no job.
KINDS = ("radial", "rectangular", "moons", "spiral")
UPWEIGHT_SAMPLE = 8192  # unlearn.UPWEIGHT_SAMPLE, the default of --upweight-sample
Kind = enum.Enum("Kind", {name: name for name in KINDS}, type=str)  # type: ignore[misc]


ARCHS = ("mlp", "cnn", "resnet18", "densenet")  # and FILE.py:Class


def _arch_file(value: Path | None) -> Path | None:
    """--arch-file: the user's architecture file, named again (moved or copied). It is
    only hashed here; a checkpoint's class is imported from it when the sha256 matches."""
    if value is not None:
        from puma_cli.models.user import register_arch_file

        try:
            register_arch_file(value)
        except PumaError as exc:
            console.error(str(exc))
            raise typer.Exit(1) from None
    return value


class Activation(enum.StrEnum):
    relu = "relu"
    sigmoid = "sigmoid"


class Optimizer(enum.StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Augment(enum.StrEnum):  # models.augment.AUGMENTS
    none = "none"
    flip = "flip"
    crop = "crop"
    flip_crop = "flip-crop"


class LrSchedule(enum.StrEnum):  # models.augment.LR_SCHEDULES
    constant = "constant"
    cosine = "cosine"
    step = "step"


ArchOpt = Annotated[
    str,
    typer.Option(
        "--arch",
        help="mlp (the paper's FlexibleFCN), cnn, resnet18 (CIFAR form), densenet (the "
        "paper's), or FILE.py:Class for your own nn.Module (or FILE.py:function, one that "
        "builds and returns it): that file is imported, so its code runs; the model records "
        "its path and sha256.",
    ),
]
ArchArgsOpt = Annotated[
    str,
    typer.Option(
        "--arch-args",
        help="JSON object of constructor arguments, e.g. '{\"width\": 32}' (resnet18), "
        "'{\"growth_rate\": 12}' (densenet) or your class's own.",
    ),
]
HiddenOpt = Annotated[
    str,
    typer.Option("--hidden", help="mlp/cnn hidden widths, e.g. 64,32; none: logistic regression."),
]
ActivationOpt = Annotated[Activation, typer.Option("--activation", help="mlp's: relu or sigmoid.")]
EpochsOpt = Annotated[int, typer.Option("--epochs")]
LrOpt = Annotated[float, typer.Option("--lr", help="The optimiser's learning rate.")]
OptimizerOpt = Annotated[
    Optimizer,
    typer.Option(
        "--optimizer",
        help="adam (weight decay as an L2 term of the loss), adamw (torch's AdamW: "
        "decoupled weight decay) or sgd (momentum 0.9, weight decay as L2).",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size")]
AugmentOpt = Annotated[
    Augment,
    typer.Option(
        "--augment",
        help="Images only: flip each training image left-right at random (flip), shift it "
        "by up to an eighth of its side with zero padding (crop: 4 pixels on 32x32), or "
        "both (flip-crop, the CIFAR recipe). Recorded, so retraining and shadow models "
        "train the same way; removal's derivatives use the images as they are.",
    ),
]
LrScheduleOpt = Annotated[
    LrSchedule,
    typer.Option(
        "--lr-schedule",
        help="constant; cosine: anneal the learning rate to 0 over the epochs; step: divide "
        "it by 10 after half and after three quarters of them (He et al.'s CIFAR recipe). "
        "Stepped once an epoch; recorded like --augment.",
    ),
]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay")]
ClipOpt = Annotated[
    float,
    typer.Option(
        "--clip-grad-norm",
        help="Scale each step's gradient down to this norm at most (torch's "
        "clip_grad_norm_, as transformer recipes train); 0: off. Recorded like --lr-schedule; "
        "the fine-tuning baselines clip too.",
    ),
]
MixupOpt = Annotated[
    float,
    typer.Option(
        "--mixup",
        help="Mixup's Beta alpha (0.2, say; 0: off): each batch's rows blended with partner "
        "rows of the batch, and their losses by the same weights. Recorded like "
        "--lr-schedule. Its loss pairs rows: removal differentiates each row's own loss.",
    ),
]
CutmixOpt = Annotated[
    float,
    typer.Option(
        "--cutmix",
        help="CutMix's Beta alpha (1.0, say; 0: off): a box of a partner image pasted over "
        "each image, the losses weighted by the areas. With --mixup too, each batch takes "
        "one of the two, even odds. Recorded like --mixup.",
    ),
]
InputDivisorOpt = Annotated[
    float,
    typer.Option(
        "--input-divisor",
        help="The network takes the data's values divided by this: 255 for 8-bit images "
        "as torchvision's ToTensor gives them (puma reads them as 0..255). import: what the "
        "weights were trained behind; train: in place of the fitted standardisation.",
    ),
]
NormalizeMeanOpt = Annotated[
    str,
    typer.Option(
        "--normalize-mean",
        help="And then normalised as torchvision's Normalize(mean, std) does: the mean, "
        "one value or one per channel (0.4914,0.4822,0.4465), after the divisor.",
    ),
]
NormalizeStdOpt = Annotated[str, typer.Option("--normalize-std", help="Normalize's std, likewise.")]
WarmupOpt = Annotated[
    int,
    typer.Option(
        "--lr-warmup-epochs",
        help="Raise the learning rate linearly from 1 % of --lr over these first epochs "
        "(torchvision's linear warmup), then run --lr-schedule over the rest. Recorded "
        "like --lr-schedule.",
    ),
]
LabelSmoothingOpt = Annotated[
    float,
    typer.Option(
        "--label-smoothing",
        help="Train against (1 - s) x the label + s / K on every class (torch's "
        "label_smoothing), in [0, 1). Recorded: retraining, SISA, shadow models and the "
        "fine-tuning baselines train with it, and removal differentiates that loss.",
    ),
]
ClassWeightOpt = Annotated[
    str,
    typer.Option(
        "--class-weight",
        help="Weigh each class's rows in the cross-entropy (torch's weight): balanced "
        "(n / (K x the class's count) over the trained rows, scikit-learn's), or one number "
        "a class in label order, like 1,5. Recorded as numbers: retraining, SISA, shadow "
        "models and the fine-tuning baselines train with them, and removal differentiates "
        "that loss.",
    ),
]
RemovalModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="Checkpoint to remove points from.", readable=False)
]
MarkedOpt = Annotated[
    Path, typer.Option("--marked", help="Ids file of the points to remove.", readable=False)
]
MixedPrecisionOpt = Annotated[
    bool,
    typer.Option(
        "--mixed-precision",
        help="Train in bfloat16 autocast (weights and optimiser in float32): faster on a "
        "GPU that has bfloat16; recorded, so retraining and shadow models use it too. "
        "Removal's derivatives never do.",
    ),
]
TestOpt = Annotated[
    Path | None, typer.Option("--test", help="Test file to report on.", readable=False)
]

ArchFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--arch-file",
        help="The FILE.py of a model trained with --arch FILE.py:Class, if it has moved: "
        "imported (its code runs) only when its sha256 is the one the model records.",
        callback=_arch_file,
        readable=False,
    ),
]


class Method(enum.StrEnum):
    puma = "puma"
    influence = "influence"
    retrain = "retrain"
    sisa = "sisa"
    amnesiac = "amnesiac"
    ssd = "ssd"
    finetune = "finetune"
    neggrad = "neggrad"
    random_labels = "random-labels"
    salun = "salun"
    scrub = "scrub"


TUNING = (Method.finetune, Method.neggrad, Method.random_labels, Method.salun, Method.scrub)


class Forget(enum.StrEnum):
    step = "step"
    match = "match"
    repair = "repair"
    none = "none"


class Solver(enum.StrEnum):
    cg = "cg"
    lissa = "lissa"
    exact = "exact"


DampingOpt = Annotated[
    float, typer.Option("--damping", help="mu as a share of the Hessian's largest eigenvalue.")
]
SolverOpt = Annotated[
    Solver, typer.Option("--solver", help="Inverse solver for exact and ggn curvature.")
]


class Curvature(enum.StrEnum):
    auto = "auto"
    exact = "exact"
    ggn = "ggn"
    kfac = "kfac"
    ekfac = "ekfac"


CurvatureOpt = Annotated[
    Curvature,
    typer.Option(
        "--curvature",
        help="exact (the Hessian), ggn (Gauss-Newton), kfac or ekfac (Kronecker-factored "
        "GGN, fitted once and cached beside the model); auto: exact up to 10 million "
        "parameter-rows (parameters x rows trained on), kfac past that, or ggn where "
        "the factors would cost more than its solves or half the memory (a very wide "
        "input layer).",
    ),
]
CurvatureSamplesOpt = Annotated[
    int,
    typer.Option(
        "--curvature-samples",
        help="Training rows the K-FAC/EK-FAC factors are fitted on (0: up to 10,000).",
    ),
]
CriterionDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--criterion-data",
        help="Held-out data for C (default: the validation split).",
        readable=False,
    ),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the H^-1 grad C cache.")
]


ULIRA_DEFAULT = 16


def default_shadows(attack: str) -> int:
    """--shadows when not given: LiRA's 16; U-LiRA's measured (benchmarks/forgetting.py)."""
    return ULIRA_DEFAULT if attack == "u-lira" else 16


class Attack(enum.StrEnum):
    loss = "loss"
    lira = "lira"
    lira_online = "lira-online"
    shokri = "shokri"
    u_lira = "u-lira"


class Score(enum.StrEnum):
    puma = "puma"
    ntk = "ntk"
    self_influence = "self-influence"
