"""Commands that mark points and remove them: mark, remove, compare."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from puma_cli import console
from puma_cli.cli.base import app, domain_errors, joined_world, render, resolve_device
from puma_cli.cli.options import (
    TUNING,
    UPWEIGHT_SAMPLE,
    ArchFileOpt,
    ConfigOpt,
    CriterionDataOpt,
    Curvature,
    CurvatureOpt,
    CurvatureSamplesOpt,
    DampingOpt,
    DeviceOpt,
    Forget,
    IdColOpt,
    JsonOpt,
    LabelColOpt,
    MarkedOpt,
    Method,
    NoCacheOpt,
    OverwriteOpt,
    RemovalModelOpt,
    SeedOpt,
    Solver,
    SolverOpt,
)
from puma_cli.errors import PumaError


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
    render(as_json, asdict(report), f"marked {report.count} of {report.n} points")


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
        joined_world(device) as (torch_device, leader),
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
    render(as_json, payload, f"removed {report.removed} points with {report.method}")


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
