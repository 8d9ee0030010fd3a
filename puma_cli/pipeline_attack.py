"""`attack` from files: targets from the recorded training file, non-members from a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from puma_cli import checkpoint as ckpt
from puma_cli.atomic import check_outputs, write_atomically
from puma_cli.attacks import AttackReport, loss_attack, per_point_loss, roc_curve
from puma_cli.data import DataError, load_dataset, read_ids, rows_for_ids
from puma_cli.errors import PumaError


def attack(
    model: Path,
    targets: Path,
    *,
    method: str = "loss",
    nonmembers: Path | None = None,
    plot: Path | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> AttackReport:
    """Attack the targets (ids of the recorded training file) against non-member data."""
    if method != "loss":
        raise PumaError(f"--attack {method!r}: only loss is available yet")
    check_outputs([plot], [model, targets, nonmembers], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    dataset = ckpt.load_recorded_dataset(checkpoint, "train")
    ids = read_ids(targets)
    if not ids:
        raise DataError(f"{targets} names no ids; give the ids to test for membership")
    target_set = dataset.subset(rows_for_ids(dataset, ids, targets))
    if nonmembers is not None:
        other = load_dataset(nonmembers, class_names=checkpoint.class_names)
        ckpt.check_compatible(checkpoint, other)
    elif checkpoint.data.get("test") is not None:
        other = ckpt.load_recorded_dataset(checkpoint, "test")
    else:
        raise PumaError(f"{model} records no test file; give non-members with --nonmembers FILE")
    trained = dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
    report = loss_attack(checkpoint.model, target_set, other, trained)
    if plot is not None:
        from puma_cli.plots import save_roc

        fpr, tpr = roc_curve(
            -per_point_loss(checkpoint.model, target_set), -per_point_loss(checkpoint.model, other)
        )
        write_atomically({plot: lambda tmp: save_roc(tmp, fpr, tpr, report.auc, method)}, overwrite)
    return report
