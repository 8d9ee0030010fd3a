"""Commands on a checkpoint as a file: export, relink, info."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from puma_cli import console
from puma_cli.cli.base import app, domain_errors, render, resolve_device
from puma_cli.cli.options import ArchFileOpt, ConfigOpt, DeviceOpt, JsonOpt, OverwriteOpt, SeedOpt


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
    render(as_json, payload, f"exported {report.output}")


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
    render(as_json, payload, f"relinked {report.output}")


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
        ("parameters", _parameters_line(meta)),
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


def _parameters_line(meta: dict[str, Any]) -> str:
    """2,179, or 2,179 (992 frozen) where some are."""
    frozen = meta.get("frozen_parameters", 0)
    return f"{meta['n_parameters']:,}" + (f" ({frozen:,} frozen)" if frozen else "")
