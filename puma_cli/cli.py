"""The `puma` command line: one short function per command: parse, one job, render.

Only typer, rich (through `console`) and the YAML reader load at import time: each
command imports its job when it runs, so `puma --help` never loads torch or scikit-learn.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from puma_cli import console
from puma_cli.errors import SEED_MAX, PumaError, out_of_memory, require_range
from puma_cli.io.config import load_config

if TYPE_CHECKING:
    import torch

    from puma_cli.models.recipe import TrainRecipe

app = typer.Typer(
    name="puma",
    help="Remove marked training points from a trained PyTorch classifier (PUMA), and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

F = TypeVar("F", bound=Callable[..., Any])
COMMANDS = (
    "make-data",
    "train",
    "import",
    "mark",
    "remove",
    "compare",
    "attack",
    "debug-labels",
    "calibrate",
    "eval",
    "info",
    "export",
    "relink",
)


PARALLEL_COMMANDS = ("remove", "attack")  # what torchrun may start (`puma_cli.parallel`)


FOLLOWER_GRACE = 5.0  # seconds a process of rank > 0 waits before reporting an error


def _follower() -> bool:
    """A process of rank > 0 under torchrun: rank 0 reports; the input is the same in all."""
    return os.environ.get("RANK", "0") not in ("", "0")


def _report(message: str) -> None:
    """`Error: message`, once under torchrun. Every process meets the same input, so rank 0
    says it, and torchrun stops the others as soon as rank 0 exits. A process of rank > 0
    waits FOLLOWER_GRACE first: exiting at once would let torchrun stop rank 0 before it
    had said anything (it may be a moment behind), and one still running after the wait
    met an error of its own (its GPU, say), which it then says."""
    if _follower():
        time.sleep(FOLLOWER_GRACE)
    console.error(message)


def domain_errors(fn: F) -> F:
    """Turn a PumaError (or an OS refusal such as a full disk), memory running out (the
    GPU's or the machine's), or any exception raised in a user's architecture file, into
    `Error: ...` and exit 1 (said once under torchrun, by rank 0: every process meets the
    same input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PumaError as exc:
            _report(str(exc))
            raise typer.Exit(1) from None
        except OSError as exc:
            _report(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
            raise typer.Exit(1) from None
        except Exception as exc:
            from puma_cli.models.user import raised_in_user_code

            said = out_of_memory(exc) or raised_in_user_code(exc)  # the memory, wherever
            if said is None:
                raise  # puma's own bug: the traceback is for us
            _report(said)
            raise typer.Exit(1) from None

    wrapper.__doc__ = _reflowed(fn.__doc__)
    return wrapper  # type: ignore[return-value]


def _reflowed(doc: str | None) -> str | None:
    """A command's docstring with each paragraph on one line: typer keeps the single line
    breaks of the paragraphs after the first, and rich then wraps each source line again
    (an 80-column terminal showed a word alone on a line)."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in paragraphs)


def _version(wanted: bool) -> None:
    """`puma --version`: this version and the ones a bug report needs, read from the
    installed packages' metadata (nothing imported)."""
    if not wanted:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from puma_cli import __version__

    parts = [f"python {platform.python_version()}"]
    for package in ("torch", "curvlinops-for-pytorch"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package.split('-')[0]} {version(package)}")
    typer.echo(f"puma {__version__} ({', '.join(parts)})")
    raise typer.Exit(0)


@app.callback()
def _one_process_unless_parallel(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Refuse torchrun for commands that do not split their work: K copies of `train`
    would write one file K times."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1") and ctx.invoked_subcommand not in PARALLEL_COMMANDS:
        _report(
            f"torchrun started {world} processes, but `puma {ctx.invoked_subcommand}` runs "
            f"in one: torchrun splits {' and '.join(PARALLEL_COMMANDS)} only; run it "
            "without torchrun"
        )
        raise typer.Exit(1)


@contextlib.contextmanager
def _world(name: str) -> Iterator[tuple[torch.device, bool]]:
    """The device this process computes on and whether it reports (rank 0), with the
    torchrun process group joined inside the block (nothing to join in one process)."""
    from puma_cli import parallel

    device = parallel.join(resolve_device(name))
    try:
        yield device, parallel.leader()
    finally:
        parallel.leave()


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


def resolve_device(name: str) -> torch.device:
    from puma_cli.devices import resolve_device as resolve

    return resolve(name)


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


class Activation(str, enum.Enum):
    relu = "relu"
    sigmoid = "sigmoid"


class Optimizer(str, enum.Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Augment(str, enum.Enum):  # models.augment.AUGMENTS
    none = "none"
    flip = "flip"
    crop = "crop"
    flip_crop = "flip-crop"


class LrSchedule(str, enum.Enum):  # models.augment.LR_SCHEDULES
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


def _render(as_json: bool, payload: dict[str, Any], title: str) -> None:
    """One JSON object, or the payload's warnings on stderr and the rest as a table."""
    if as_json:
        console.emit_json(payload)
        return
    for warning in payload.pop("warnings", []):
        console.warn(warning)
    console.table(title, [(k, v) for k, v in payload.items() if v is not None])


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
    _render(as_json, asdict(report), f"wrote {report.path}")


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
    _render(as_json, payload, f"trained {report.model}")


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
    _render(as_json, {**asdict(report), "device": str(torch_device)}, f"imported {weights}")


@app.command()
@domain_errors
def mark(
    data: Annotated[
        Path, typer.Argument(help="The training data to mark points of.", readable=False)
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Ids file to write.", readable=False)
    ],
    cls: Annotated[
        str | None,
        typer.Option(
            "--class",
            help="Mark the smallest k-means cluster of this class: its number, or its name"
            " where the labels are names.",
        ),
    ] = None,
    clusters: Annotated[int, typer.Option("--clusters", help="k for k-means.")] = 8,
    all_classes: Annotated[
        bool, typer.Option("--all-classes", help="One smallest cluster per class.")
    ] = False,
    random: Annotated[
        float | None, typer.Option("--random", help="Mark this share at random instead.")
    ] = None,
    label_col: LabelColOpt = "label",
    id_col: IdColOpt = "id",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Mark training points for removal (the paper's k-means marking, or at random)."""
    from puma_cli.io.datasets import DataOptions
    from puma_cli.jobs.mark import mark as job

    resolve_device(device)
    with console.phase_progress(enabled=not as_json) as phases:
        report = job(
            data,
            output,
            cls=cls,
            clusters=clusters,
            all_classes=all_classes,
            random_frac=random,
            seed=seed,
            options=DataOptions(label_col, id_col),
            overwrite=overwrite,
            phases=phases,
        )
    _render(as_json, asdict(report), f"marked {report.count} of {report.n} points")


class Method(str, enum.Enum):
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


class Forget(str, enum.Enum):
    step = "step"
    match = "match"
    repair = "repair"
    none = "none"


class Solver(str, enum.Enum):
    cg = "cg"
    lissa = "lissa"
    exact = "exact"


DampingOpt = Annotated[
    float, typer.Option("--damping", help="mu as a share of the Hessian's largest eigenvalue.")
]
SolverOpt = Annotated[
    Solver, typer.Option("--solver", help="Inverse solver for exact and ggn curvature.")
]


class Curvature(str, enum.Enum):
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


def _eta(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a number (a multiple of 1/N) or auto") from None
    return value  # its range is the library's to check, like every number


@app.command()
@domain_errors
def remove(
    model: RemovalModelOpt,
    marked: MarkedOpt,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Default: <stem>.removed.safetensors.", readable=False),
    ] = None,
    method: Annotated[Method, typer.Option("--method")] = Method.puma,
    eta: Annotated[
        str,
        typer.Option("--eta", help="Step as a multiple of 1/N (1 = first-order exact), or auto."),
    ] = "auto",
    damping: DampingOpt = 0.01,
    solver: SolverOpt = Solver.cg,
    curvature: CurvatureOpt = Curvature.auto,
    curvature_samples: CurvatureSamplesOpt = 0,
    upweight_sample: Annotated[
        int,
        typer.Option(
            "--upweight-sample",
            help="Reweight this many random remaining points (0: all of them).",
        ),
    ] = UPWEIGHT_SAMPLE,
    lambda_cap: Annotated[
        float, typer.Option("--lambda-cap", help="Largest weight one remaining point may get.")
    ] = 1.0,
    max_accuracy_drop: Annotated[
        float, typer.Option("--max-accuracy-drop", help="--eta auto's guard, in accuracy points.")
    ] = 1.0,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            help="ssd: select parameters with I_forget > alpha I_D (10); neggrad: weight of "
            "the remaining rows' loss, 1 - alpha on the marked rows' (0.999).",
        ),
    ] = None,
    lambda_: Annotated[
        float, typer.Option("--lambda", help="ssd: dampening constant, beta = lambda I_D / I_f.")
    ] = 1.0,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="finetune, neggrad, random-labels, salun, scrub: epochs (default: a tenth "
            "of the recipe's).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="The fine-tuning baselines' learning rate (the recipe's)."),
    ] = None,
    mask_share: Annotated[
        float, typer.Option("--mask-share", help="salun: share of the weights it may move.")
    ] = 0.5,
    forget: Annotated[
        Forget,
        typer.Option(
            "--forget",
            help="puma, influence: step (the --eta auto step guarded by accuracy, not by the "
            "remaining rows' loss), match (step, stopped where the marked rows' loss reaches "
            "the held-out loss), repair (then a short fine-tune) or none (the paper's).",
        ),
    ] = Forget.step,
    criterion_data: CriterionDataOpt = None,
    no_cache: NoCacheOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove the marked points' influence from a model and record it.

    puma (default) and influence patch the weights; retrain reruns the recipe; sisa
    retrains the affected shards of a `train --shards` ensemble; amnesiac subtracts the
    updates `train --record-updates` kept; ssd dampens parameters (Foster et al.);
    finetune, neggrad (NegGrad+), random-labels, salun (SalUn) and scrub (SCRUB) train
    the model on for a few epochs (the approximate baselines of recent papers).
    """
    from puma_cli.jobs.remove import remove as job
    from puma_cli.unlearn import RemovalOptions

    if alpha is not None and method not in (Method.ssd, Method.neggrad):
        raise PumaError(f"--alpha is for --method ssd and neggrad, not {method.value}")
    tuning = {} if alpha is None else {
        "ssd_alpha" if method == Method.ssd else "neggrad_alpha": alpha
    }  # fmt: skip
    options = RemovalOptions(
        eta=_eta(eta),
        damping=damping,
        solver=solver.value,
        upweight_sample=upweight_sample,
        lambda_cap=lambda_cap,
        max_accuracy_drop=max_accuracy_drop,
        ssd_lambda=lambda_,
        epochs=epochs,
        lr=lr,
        mask_share=mask_share,
        forget=forget.value,
        **tuning,  # type: ignore[arg-type]
        seed=seed,
        curvature=curvature.value,
        curvature_samples=curvature_samples,
    )
    retraining = method in (Method.retrain, Method.sisa, *TUNING)
    label = "fine-tuning" if method in TUNING else "retraining"
    with (
        _world(device) as (torch_device, leader),
        console.bars(enabled=leader and not as_json) as shown,
    ):
        report = job(
            model,
            marked,
            output,
            method=method.value,
            options=options,
            criterion_data=criterion_data,
            use_cache=not no_cache,
            device=torch_device,
            overwrite=overwrite,
            progress=shown.epochs(label) if retraining else None,
            phases=shown.phases,
        )
    if not leader:
        return
    payload = asdict(report)
    if not as_json:
        payload.pop("parameters")
    _render(as_json, payload, f"removed {report.removed} points with {report.method}")


@app.command()
@domain_errors
def compare(
    model: RemovalModelOpt,
    marked: MarkedOpt,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated, e.g. puma,finetune,scrub (default: every method that "
            "applies to the model); retrain always runs: it is the reference.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir", help="Where the models go (default: <stem>.compare/).", readable=False
        ),
    ] = None,
    shadows: Annotated[
        int,
        typer.Option(
            "--shadows",
            help="Shadow models for LiRA's column (0: leave LiRA out) and --audit's (16).",
        ),
    ] = 0,
    audit: Annotated[
        bool,
        typer.Option(
            "--audit",
            help="Also run U-LiRA on each method (its removal repeated on the shadow models).",
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG: marked loss and KL per method.", readable=False),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run several removal methods on one request and compare them with retraining.

    Per method: test, remaining and marked accuracy, the marked rows' loss, KL from the
    retrained model (beside retraining's seed-to-seed noise floor), the loss attack's and
    LiRA's AUC on the marked rows, and the time as a ratio to retraining's.
    """
    from puma_cli.jobs.compare import compare as job
    from puma_cli.jobs.compare import parse_methods

    with console.phase_progress(enabled=not as_json) as phases:
        report = job(
            model,
            marked,
            methods=parse_methods(methods),
            out_dir=out_dir,
            shadows=shadows,
            plot=plot,
            seed=seed,
            device=resolve_device(device),
            overwrite=overwrite,
            phases=phases,
            audit=audit,
        )
    payload = asdict(report)
    if as_json:
        console.emit_json(payload)
        return
    for note in report.notes:
        console.warn(note)
    header = ["method", "test", "remain", "marked", "m.loss", "KL m", "KL t", "loss",
              "LiRA", "time"]  # fmt: skip
    rows = [
        [r.method, r.test_accuracy, r.remaining_accuracy, r.marked_accuracy, r.marked_loss,
         r.kl_marked, r.kl_test, r.loss_auc, r.lira_auc, r.time_ratio]
        for r in report.methods if r.refused is None
    ]  # fmt: skip
    rows.append(["seed to seed", None, None, None, None, report.noise_floor_kl_marked,
                 report.noise_floor_kl_test, None, None, None])  # fmt: skip
    if audit:
        header += ["U-LiRA acc", "F"]
        audited = [r for r in report.methods if r.refused is None]
        for row, r in zip(rows, audited, strict=False):
            row += [r.ulira_accuracy, r.forgetting_score]
        rows[-1] += [None, None]
    console.grid(
        f"{report.n_marked} marked rows removed from {model}, models in {report.out_dir}: "
        "accuracy on test, remaining and marked rows; the marked rows' loss; KL from the "
        "retrained model on marked and test rows; the loss attack's and LiRA's AUC on the "
        f"marked rows; time / retraining's ({report.retrain_seconds:.2f} s)"
        + (
            f"; U-LiRA's accuracy and forgetting score, {report.audit_shadows} shadows"
            if audit
            else ""
        ),
        header,
        rows,
    )
    for r in report.methods:
        if r.refused is not None:
            console.warn(f"{r.method} refused: {r.refused}")


ULIRA_DEFAULT = 16


def default_shadows(attack: str) -> int:
    """--shadows when not given: LiRA's 16; U-LiRA's measured (benchmarks/forgetting.py)."""
    return ULIRA_DEFAULT if attack == "u-lira" else 16


class Attack(str, enum.Enum):
    loss = "loss"
    lira = "lira"
    lira_online = "lira-online"
    shokri = "shokri"
    u_lira = "u-lira"


@app.command()
@domain_errors
def attack(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint to attack.", readable=False)
    ],
    targets: Annotated[
        Path, typer.Option("--targets", help="Ids of the training file to test.", readable=False)
    ],
    method: Annotated[
        Attack,
        typer.Option(
            "--attack",
            help="loss, lira, lira-online, shokri, or u-lira (audits the removal that made "
            "the model: the same method on shadow models, against shadows that never saw "
            "the targets).",
        ),
    ] = Attack.loss,
    nonmembers: Annotated[
        Path | None,
        typer.Option(
            "--nonmembers", help="Non-member data (default: the test file).", readable=False
        ),
    ] = None,
    shadows: Annotated[
        int | None,
        typer.Option(
            "--shadows",
            help=f"Shadow models for lira/shokri (16) and u-lira ({ULIRA_DEFAULT}), cached beside "
            "the model.",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG: the ROC curve, log axes.", readable=False)
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Membership inference on the targets: did the removal work?"""
    from puma_cli.jobs.attack import attack as job

    with (
        _world(device) as (torch_device, leader),
        console.bars(enabled=leader and not as_json) as shown,
    ):
        report = job(
            model,
            targets,
            method=method.value,
            nonmembers=nonmembers,
            shadows=shadows if shadows is not None else default_shadows(method.value),
            plot=plot,
            seed=seed,
            device=torch_device,
            overwrite=overwrite,
            progress=shown.models("shadow models"),
            phases=shown.phases,
        )
    if not leader:
        return
    payload = asdict(report)
    payload["tpr_at_0.1pct_fpr"] = payload.pop("tpr_at_01pct_fpr")
    if as_json:
        console.emit_json(payload)
        return
    for note in payload.pop("notes"):
        console.warn(note)
    _render(False, payload, f"{report.attack} attack on {model}")


class Score(str, enum.Enum):
    puma = "puma"
    ntk = "ntk"
    self_influence = "self-influence"


@app.command("debug-labels")
@domain_errors
def debug_labels(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint whose data to review.", readable=False)
    ],
    k: Annotated[int, typer.Option("-k", help="Suspects to list (0: every row).")] = 50,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="CSV of the ranked suspects.", readable=False),
    ] = None,
    score: Annotated[
        Score,
        typer.Option(
            "--score",
            help="puma, ntk or self-influence (g_i C^-1 g_i, C the --curvature: dense up to "
            "6,000 parameters, K-FAC/EK-FAC blocks at any size).",
        ),
    ] = Score.puma,
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="Ids known to be mislabelled: report recall.", readable=False),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG: flipped labels found vs data reviewed.", readable=False),
    ] = None,
    confidence_filter: Annotated[
        bool,
        typer.Option(
            "--confidence-filter/--no-confidence-filter",
            help="Move near-boundary points behind the others (Algorithm 2).",
        ),
    ] = True,
    agreeing: Annotated[
        bool,
        typer.Option(
            "--agreeing-criterion/--full-criterion",
            help="Take C over the criterion points whose label the model predicts (robust "
            "to noise there), or over all of them.",
        ),
    ] = True,
    damping: DampingOpt = 0.01,
    solver: SolverOpt = Solver.cg,
    curvature: CurvatureOpt = Curvature.auto,
    curvature_samples: CurvatureSamplesOpt = 0,
    criterion_data: CriterionDataOpt = None,
    no_cache: NoCacheOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Rank training points by how much they hurt held-out loss: mislabel suspects first."""
    from puma_cli.engine.criterion import SolverSettings
    from puma_cli.jobs.debug_labels import debug_labels as job

    with console.phase_progress(enabled=not as_json) as phases:
        report = job(
            model,
            k=k,
            output=output,
            score=score.value,
            truth=truth,
            plot=plot,
            confidence_filter=confidence_filter,
            settings=SolverSettings(
                solver.value, damping, "auto", seed, curvature.value, curvature_samples
            ),
            criterion_data=criterion_data,
            use_cache=not no_cache,
            agreeing_criterion=agreeing,
            device=resolve_device(device),
            overwrite=overwrite,
            phases=phases,
        )
    payload = asdict(report)
    if as_json:
        console.emit_json(payload)
        return
    shown = ", ".join(report.suspects[:10]) + (" ..." if len(report.suspects) > 10 else "")
    payload["suspects"] = f"{len(report.suspects)} of {report.n}: {shown}"
    payload.update(payload.pop("truth"))
    _render(False, payload, f"label review of {model} ({report.score})")


@app.command()
@domain_errors
def calibrate(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint to recalibrate.", readable=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Default: <stem>.calibrated.safetensors.", readable=False
        ),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="ECE bins.")] = 15,
    k: Annotated[
        int | None, typer.Option("-k", help="Rows Algorithm 3 looks at (default: 10 %).")
    ] = None,
    max_accuracy_drop: Annotated[
        float,
        typer.Option("--max-accuracy-drop", help="In accuracy points; else nothing is written."),
    ] = 0.5,
    lambda_cap: Annotated[float, typer.Option("--lambda-cap")] = 1.0,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG: reliability diagrams before and after.", readable=False),
    ] = None,
    damping: DampingOpt = 0.01,
    solver: SolverOpt = Solver.cg,
    curvature: CurvatureOpt = Curvature.auto,
    curvature_samples: CurvatureSamplesOpt = 0,
    criterion_data: CriterionDataOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Lower a model's calibration error with a PUMA patch (Algorithm 3), keeping accuracy."""
    from puma_cli.engine.criterion import SolverSettings
    from puma_cli.jobs.calibrate import calibrate as job

    with console.phase_progress(enabled=not as_json) as phases:
        report = job(
            model,
            output,
            bins=bins,
            k=k,
            max_accuracy_drop=max_accuracy_drop,
            lambda_cap=lambda_cap,
            plot=plot,
            settings=SolverSettings(
                solver.value, damping, "auto", seed, curvature.value, curvature_samples
            ),
            criterion_data=criterion_data,
            device=resolve_device(device),
            overwrite=overwrite,
            phases=phases,
        )
    _render(as_json, asdict(report), f"calibrated {model} -> {report.output}")


@app.command("eval")
@domain_errors
def eval_(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint to evaluate.", readable=False)
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="Data file to evaluate on.", readable=False)
    ] = None,
    on: Annotated[
        str | None,
        typer.Option(
            "--on",
            help="Or a file the checkpoint recorded: train (the rows trained on; with --ids, "
            "any row of it, removed ones too), val or test.",
        ),
    ] = None,
    ids: Annotated[
        Path | None, typer.Option("--ids", help="Only these ids of the data.", readable=False)
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="ECE bins.")] = 15,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Accuracy, mean loss and ECE of a model on a data file (or some ids of it)."""
    from puma_cli.jobs.evaluate import evaluate_model as job

    torch_device = resolve_device(device)
    with console.phase_progress(enabled=not as_json) as phases:
        report = job(model, data=data, on=on, ids=ids, bins=bins, device=torch_device,
                     phases=phases)  # fmt: skip
    payload = {
        **asdict(report.evaluation),
        "model": str(model),
        "data": str(report.data),
        "ids_file": str(report.ids_file) if report.ids_file else None,
    }
    _render(as_json, payload, f"{model} on {report.data}")


@app.command()
@domain_errors
def export(
    model: Annotated[
        Path, typer.Argument(help="Checkpoint whose network to export.", readable=False)
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="The .safetensors state dict to write.", readable=False
        ),
    ],
    like: Annotated[
        Path | None,
        typer.Option(
            "--like",
            help="Name the tensors (and give them the dtypes) of this weights file, as "
            "puma import read it: the file the model was imported from, so that the code "
            "that loaded it loads the export.",
            readable=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write a model's network as a plain safetensors state dict, to deploy it."""
    from puma_cli.jobs.export import export as job

    resolve_device(device)
    report = job(model, output, like=like, overwrite=overwrite)
    payload = {**asdict(report), "output": str(report.output), "model": str(report.model)}
    inputs = report.inputs
    if not as_json and inputs is not None and report.ensemble is not None:
        payload["inputs"] = "one transform a shard (--json, or the file's puma_export metadata)"
    elif not as_json and inputs is not None and len(inputs["mean"]) > 8:  # a table's features
        payload["inputs"] = (
            f"divisor {inputs['divisor']:g}, then (x - mean) / std with {len(inputs['mean'])} "
            "values each (--json, or the file's puma_export metadata)"
        )
    _render(as_json, payload, f"exported {report.output}")


@app.command()
@domain_errors
def relink(
    model: Annotated[
        Path, typer.Argument(help="Checkpoint whose removed rows you deleted.", readable=False)
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="The training file as it is now: the recorded one less the rows the model "
            "removed, every other row as it was (ids, column order and path may differ).",
            readable=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Checkpoint to write.", readable=False)
    ],
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Point a model at its training file once the rows it removed are deleted from it.

    A checkpoint refuses a changed training file; after `remove`, delete the removed rows
    from the file too, and relink: the model then records the file as it is, and every
    later command (mark, remove, attack, eval) works on it.
    """
    from puma_cli.jobs.relink import relink as job

    resolve_device(device)
    with console.phase_progress(enabled=not as_json) as phases:
        report = job(model, data, output, overwrite=overwrite, phases=phases)
    payload = {
        **asdict(report),
        "output": str(report.output),
        "model": str(report.model),
        "data": str(report.data),
    }
    _render(as_json, payload, f"relinked {report.output}")


@app.command()
@domain_errors
def info(
    model: Annotated[Path, typer.Argument(help="Checkpoint to describe.", readable=False)],
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    arch_file: ArchFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Architecture, training recipe, data files and provenance of a checkpoint."""
    from puma_cli.jobs.info import describe as job
    from puma_cli.jobs.info import (
        exported_rows,
        metrics_line,
        provenance_line,
        rows_line,
        settings_line,
    )

    resolve_device(device)
    meta = job(model)
    if as_json:
        console.emit_json(meta)
        return
    if meta["format"] == "puma-export":
        console.table(str(model), exported_rows(meta))
        return
    history = meta["provenance"]
    imported = bool(history) and history[0].get("op") == "import"
    rows: list[tuple[str, Any]] = [
        ("architecture", settings_line(meta["architecture"])),
        ("parameters", f"{meta['n_parameters']:,}"),
        ("classes", ", ".join(meta["class_names"] or []) or meta["n_classes"]),
        ("recipe", settings_line(meta["recipe"])),
        ("rows", rows_line(meta["rows"])),
        # Measured once, on the model as trained or imported; what each later operation
        # measured is in its provenance line.
        (f"metrics as {'imported' if imported else 'trained'}", metrics_line(meta["metrics"])),
    ]
    for role, record in meta["data"].items():
        if record is not None:
            status = meta["data_status"].get(role, "?")
            rows.append(
                (f"{role} data", f"{record['path']} ({status}, sha256 {record['sha256'][:12]})")
            )
    for name, record in meta["sidecars"].items():
        rows.append((f"{name} file", f"{record['path']} ({record['n']} steps)"))
    lines = [f"{i}. {provenance_line(entry)}" for i, entry in enumerate(history, 1)]
    rows.append(("provenance", "\n".join(lines) or "none (as trained)"))
    rows.append(("puma", f"{meta['puma_version']} (format {meta['format_version']})"))
    console.table(str(model), rows)


def main() -> None:
    app(prog_name="puma")
