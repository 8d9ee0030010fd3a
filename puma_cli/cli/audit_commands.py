"""Commands that audit and measure a model: attack, debug-labels, calibrate, eval."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from puma_cli import console
from puma_cli.cli.base import app, domain_errors, joined_world, render, resolve_device
from puma_cli.cli.options import (
    ULIRA_DEFAULT,
    ArchFileOpt,
    Attack,
    ConfigOpt,
    CriterionDataOpt,
    Curvature,
    CurvatureOpt,
    CurvatureSamplesOpt,
    DampingOpt,
    DeviceOpt,
    JsonOpt,
    NoCacheOpt,
    OverwriteOpt,
    Score,
    SeedOpt,
    Solver,
    SolverOpt,
    default_shadows,
)


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
        joined_world(device) as (torch_device, leader),
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
    render(False, payload, f"{report.attack} attack on {model}")


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
    from puma_cli.engine.training_engine import SolverSettings
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
    render(False, payload, f"label review of {model} ({report.score})")


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
    from puma_cli.engine.training_engine import SolverSettings
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
    render(as_json, asdict(report), f"calibrated {model} -> {report.output}")


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
    render(as_json, payload, f"{model} on {report.data}")
