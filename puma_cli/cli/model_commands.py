"""Commands that make data and models: make-data, train, import."""

from __future__ import annotations

import enum
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from puma_cli import console
from puma_cli.cli.base import app, domain_errors, render, resolve_device
from puma_cli.cli.options import (
    ARCHS,
    Activation,
    ActivationOpt,
    ArchArgsOpt,
    ArchOpt,
    Augment,
    AugmentOpt,
    BatchSizeOpt,
    ClassWeightOpt,
    ClipOpt,
    ConfigOpt,
    CutmixOpt,
    DeviceOpt,
    EpochsOpt,
    HiddenOpt,
    IdColOpt,
    InputDivisorOpt,
    JsonOpt,
    Kind,
    LabelColOpt,
    LabelSmoothingOpt,
    LrOpt,
    LrSchedule,
    LrScheduleOpt,
    MixedPrecisionOpt,
    MixupOpt,
    NormalizeMeanOpt,
    NormalizeStdOpt,
    Optimizer,
    OptimizerOpt,
    OverwriteOpt,
    SeedOpt,
    TestOpt,
    WarmupOpt,
    WeightDecayOpt,
)
from puma_cli.errors import PumaError

if TYPE_CHECKING:
    from puma_cli.models.recipe import TrainRecipe


@app.command("make-data")
@domain_errors
def make_data(
    kind: Annotated[Kind, typer.Argument(help="radial, rectangular, moons or spiral.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="CSV (or .npz) to write.", readable=False)
    ],
    n: Annotated[
        int | None, typer.Option("--n", help="Points (default: the paper's size).")
    ] = None,
    noise: Annotated[float | None, typer.Option("--noise", help="Cluster spread.")] = None,
    test_frac: Annotated[
        float, typer.Option("--test-frac", help="Also write <stem>-test.csv with this share.")
    ] = 0.0,
    flip_labels: Annotated[
        float, typer.Option("--flip-labels", help="Flip this share of training labels.")
    ] = 0.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Generate a synthetic dataset (the paper's radial and rectangular sets, moons, spiral)."""
    from puma_cli.jobs.make_data import make_data as job

    resolve_device(device)
    report = job(
        kind.value,
        output,
        n=n,
        noise=noise,
        seed=seed,
        test_frac=test_frac,
        flip_frac=flip_labels,
        overwrite=overwrite,
    )
    render(as_json, asdict(report), f"wrote {report.path}")


def _recipe(
    arch: str,
    arch_args: str,
    hidden: str,
    activation: Activation,
    epochs: int,
    lr: float,
    optimizer: Optimizer,
    batch_size: int,
    weight_decay: float,
    seed: int,
    **settings: Any,
) -> TrainRecipe:
    """The training recipe the options describe (train's, or the one import declares);
    `settings` are the recipe's other fields by name (a choice's enum as its value)."""
    from puma_cli.models.recipe import TrainRecipe

    return TrainRecipe(
        **_architecture(arch, arch_args),
        hidden=_hidden(hidden),
        activation=activation.value,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer.value,
        batch_size=batch_size,
        weight_decay=weight_decay,
        seed=seed,
        **{k: v.value if isinstance(v, enum.Enum) else v for k, v in settings.items()},
    )


def _architecture(arch: str, arch_args: str) -> dict[str, Any]:
    """The recipe's architecture fields from --arch and --arch-args."""
    import json

    try:
        args = json.loads(arch_args)
    except json.JSONDecodeError as exc:
        raise PumaError(f"--arch-args {arch_args!r} is not JSON ({exc.msg})") from None
    if not isinstance(args, dict):
        raise PumaError(f"--arch-args {arch_args!r}: give a JSON object, like '{{\"width\": 32}}'")
    if arch in ARCHS:
        return {"arch": arch, "arch_args": args}
    from puma_cli.models.user import is_user_spec, parse_user_spec

    if not is_user_spec(arch):
        raise PumaError(f"--arch {arch!r}: choose {', '.join(ARCHS)} or FILE.py:ClassName")
    return {"arch": "user", "arch_args": args, "arch_source": parse_user_spec(arch)}


def _transform(divisor: float, mean: str, std: str) -> dict[str, Any]:
    """The recipe's fixed input transform from --input-divisor and --normalize-mean/std."""
    return {
        "input_divisor": divisor,
        "normalize_mean": _floats(mean, "--normalize-mean"),
        "normalize_std": _floats(std, "--normalize-std"),
    }


def _comma_parts(text: str) -> list[str]:
    """The items of a comma-separated list, brackets and spaces allowed; empty: none."""
    return [part for part in text.strip("[]() ").split(",") if part.strip()]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in _comma_parts(text))
    except ValueError:
        raise typer.BadParameter(  # not parsed: a usage error, as --hidden's
            f"{text!r}: give numbers separated by commas, like 0.5,0.5,0.5", param_hint=option
        ) from None


def _hidden(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("none", "", "[]"):
        return ()  # no hidden layer: multinomial logistic regression
    try:
        widths = tuple(int(part) for part in _comma_parts(text))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated widths like 64,32") from None
    if min(widths, default=0) < 1:  # parsed, but out of range: bad input, not usage
        raise PumaError(f"--hidden {text}: give positive widths like 64,32")
    return widths


@app.command()
@domain_errors
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="Training data: a CSV, NPZ or IDX images file, or a folder of images "
            "(root/<class>/<image>).",
            readable=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Checkpoint to write.", readable=False)
    ],
    arch: ArchOpt = "mlp",
    arch_args: ArchArgsOpt = "{}",
    hidden: HiddenOpt = "64,32",
    activation: ActivationOpt = Activation.relu,
    epochs: EpochsOpt = 100,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = Optimizer.adam,
    batch_size: BatchSizeOpt = 32,
    weight_decay: WeightDecayOpt = 0.0,
    label_smoothing: LabelSmoothingOpt = 0.0,
    class_weight: ClassWeightOpt = "",
    mixed_precision: MixedPrecisionOpt = False,
    augment: AugmentOpt = Augment.none,
    lr_schedule: LrScheduleOpt = LrSchedule.constant,
    lr_warmup_epochs: WarmupOpt = 0,
    clip_grad_norm: ClipOpt = 0.0,
    mixup: MixupOpt = 0.0,
    cutmix: CutmixOpt = 0.0,
    standardize: Annotated[
        bool,
        typer.Option(
            "--standardize/--no-standardize",
            help="Standardise the inputs with the training rows' mean and std (each "
            "feature's; each channel's for images), recorded in the model. "
            "--no-standardize gives the net the values as they are: token ids for an "
            "Embedding, or a net that normalises its own inputs. A declared transform "
            "(--input-divisor, --normalize-mean/std) takes the place of either.",
        ),
    ] = True,
    input_divisor: InputDivisorOpt = 1.0,
    normalize_mean: NormalizeMeanOpt = "",
    normalize_std: NormalizeStdOpt = "",
    val_frac: Annotated[
        float,
        typer.Option("--val-frac", help="Hold out this share as validation (not trained on)."),
    ] = 0.1,
    val: Annotated[
        Path | None, typer.Option("--val", help="Validation file instead.", readable=False)
    ] = None,
    test: TestOpt = None,
    shards: Annotated[
        int, typer.Option("--shards", help="SISA: train this many disjoint shard models.")
    ] = 1,
    slices: Annotated[
        int, typer.Option("--slices", help="SISA: slices per shard (keeps a state per slice).")
    ] = 1,
    record_updates: Annotated[
        bool,
        typer.Option(
            "--record-updates",
            help="Amnesiac: keep every step's update in <stem>.updates.safetensors.",
        ),
    ] = False,
    group_ids: Annotated[
        Path | None,
        typer.Option(
            "--group-ids",
            help="Ids to train in as few batches (--record-updates) or shards (--shards) "
            "as they fit: the ordered scenario.",
            readable=False,
        ),
    ] = None,
    label_col: LabelColOpt = "label",
    id_col: IdColOpt = "id",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a classifier and save it as one safetensors checkpoint with its full record."""
    from puma_cli.io.datasets import DataOptions
    from puma_cli.jobs.train import train as job
    from puma_cli.models.recipe import NO_TRANSFORM

    recipe = _recipe(
        arch, arch_args, hidden, activation, epochs, lr, optimizer, batch_size, weight_decay, seed,
        mixed_precision=mixed_precision, augment=augment, lr_schedule=lr_schedule,
        label_smoothing=label_smoothing, lr_warmup_epochs=lr_warmup_epochs,
        clip_grad_norm=clip_grad_norm, mixup=mixup, cutmix=cutmix,
    )  # fmt: skip
    recipe = replace(
        recipe,
        shards=shards,
        slices=slices,
        **_transform(input_divisor, normalize_mean, normalize_std),
    )
    # A declared transform takes the place of the fitted standardisation.
    recipe = replace(recipe, standardize=standardize and recipe.fixed_inputs() == NO_TRANSFORM)
    torch_device = resolve_device(device)
    with console.bars(enabled=not as_json) as shown:
        report = job(
            data,
            output,
            recipe,
            val_frac=val_frac,
            val=val,
            test=test,
            group=group_ids,
            record_updates=record_updates,
            options=DataOptions(label_col, id_col),
            device=torch_device,
            overwrite=overwrite,
            progress=shown.epochs(f"training {data.name}"),
            phases=shown.phases,
            class_weight=class_weight,
        )
    payload = {**asdict(report), "device": str(torch_device)}
    render(as_json, payload, f"trained {report.model}")


@app.command("import")
@domain_errors
def import_(
    weights: Annotated[
        Path,
        typer.Argument(
            help="The network's state dict, saved with safetensors (never a pickle).",
            readable=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Checkpoint to write.", readable=False)
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="The data the weights were trained on.", readable=False),
    ],
    arch: ArchOpt = "mlp",
    arch_args: ArchArgsOpt = "{}",
    hidden: HiddenOpt = "64,32",
    activation: ActivationOpt = Activation.relu,
    epochs: Annotated[
        int, typer.Option("--epochs", help="The recipe they were trained with (for retrain).")
    ] = 100,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = Optimizer.adam,
    batch_size: BatchSizeOpt = 32,
    weight_decay: WeightDecayOpt = 0.0,
    label_smoothing: LabelSmoothingOpt = 0.0,
    class_weight: ClassWeightOpt = "",
    mixed_precision: MixedPrecisionOpt = False,
    augment: AugmentOpt = Augment.none,
    lr_schedule: LrScheduleOpt = LrSchedule.constant,
    lr_warmup_epochs: WarmupOpt = 0,
    clip_grad_norm: ClipOpt = 0.0,
    mixup: MixupOpt = 0.0,
    cutmix: CutmixOpt = 0.0,
    input_divisor: InputDivisorOpt = 1.0,
    normalize_mean: NormalizeMeanOpt = "",
    normalize_std: NormalizeStdOpt = "",
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Held-out data (the criterion for removal).", readable=False),
    ] = None,
    test: TestOpt = None,
    label_col: LabelColOpt = "label",
    id_col: IdColOpt = "id",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Wrap weights trained elsewhere into a puma checkpoint, with the recipe you declare."""
    from puma_cli.io.datasets import DataOptions
    from puma_cli.jobs.import_weights import import_weights as job

    recipe = _recipe(
        arch, arch_args, hidden, activation, epochs, lr, optimizer, batch_size, weight_decay, seed,
        mixed_precision=mixed_precision, augment=augment, lr_schedule=lr_schedule,
        label_smoothing=label_smoothing, lr_warmup_epochs=lr_warmup_epochs,
        clip_grad_norm=clip_grad_norm, mixup=mixup, cutmix=cutmix,
    )  # fmt: skip
    recipe = replace(recipe, **_transform(input_divisor, normalize_mean, normalize_std))
    torch_device = resolve_device(device)
    with console.phase_progress(enabled=not as_json) as phases:
        report = job(
            weights,
            output,
            recipe,
            data=data,
            val=val,
            test=test,
            options=DataOptions(label_col, id_col),
            device=torch_device,
            overwrite=overwrite,
            phases=phases,
            class_weight=class_weight,
        )
    render(as_json, {**asdict(report), "device": str(torch_device)}, f"imported {weights}")
