"""`puma attack`: targets from the recorded training file, non-members from a file.

The shadow models (LiRA, Shokri) are cached beside the checkpoint by `audit.shadows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from puma_cli import parallel
from puma_cli.audit import ATTACKS
from puma_cli.audit.lira import lira_scores
from puma_cli.audit.loss import loss_attack, per_point_loss
from puma_cli.audit.scoring import AttackReport, roc_curve, score_report
from puma_cli.audit.shadows import (
    MAX_SHADOWS,
    attack_pool,
    logit_confidence,
    shadow_cache_path,
    sorted_log_softmax,
    train_shadows,
)
from puma_cli.audit.shokri import shokri_scores
from puma_cli.data.dataset import Dataset
from puma_cli.errors import SEED_MAX, DataError, PumaError, require_range
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs, write_atomically
from puma_cli.io.cache import Cache, commit_all
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.models.predict import predict_logits

Progress = Callable[[int, int, float], None]


def attack(
    model: Path,
    targets: Path,
    *,
    method: str = "loss",
    nonmembers: Path | None = None,
    shadows: int = 16,
    plot: Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> AttackReport:
    """Attack the targets (ids of the recorded training file) against non-member data."""
    if method not in ATTACKS:
        raise PumaError(f"--attack {method!r}: choose {', '.join(ATTACKS)}")
    if method != "loss":
        require_range("--shadows", shadows, 2, MAX_SHADOWS)
    require_range("--seed", seed, 0, SEED_MAX)
    check_outputs([plot], [model, targets, nonmembers], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    recorded.protect_recorded([plot], checkpoint)
    dataset = recorded.load_recorded_dataset(checkpoint, "train")
    ids = read_ids(targets)
    if not ids:
        raise DataError(f"{targets} names no ids; give the ids to test for membership")
    target_rows = rows_for_ids(dataset, ids, targets)
    other = _nonmembers(checkpoint, model, nonmembers)
    cache: Cache | None = None
    if method == "loss":
        trained = dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
        report = loss_attack(checkpoint.model, dataset.subset(target_rows), other, trained)
        if plot is not None:  # the scores again, for the curve only
            members = -per_point_loss(checkpoint.model, dataset.subset(target_rows))
            outsiders = -per_point_loss(checkpoint.model, other)
    else:
        pool = attack_pool(dataset, other)
        # The training-set size as first trained (recorded), so that every model in a
        # removal chain shares one set of shadows.
        size = int(checkpoint.metrics.get("train", {}).get("n", len(dataset)))
        cache = Cache(shadow_cache_path(model.parent, checkpoint, pool, shadows, size, seed))
        shadow_set = train_shadows(checkpoint, pool, shadows, size, seed, cache, device, progress)
        logits = predict_logits(checkpoint.model, pool.X)
        if method == "shokri":
            scores = shokri_scores(shadow_set, sorted_log_softmax(logits), seed)
            threshold = 0.5
        else:
            phi = logit_confidence(logits, torch.as_tensor(pool.y))
            scores = lira_scores(shadow_set, phi, online=method == "lira-online")
            threshold = 0.9 if method == "lira" else 0.0
        members = scores[target_rows]
        outsiders = scores[len(dataset) :]
        report = score_report(method, members, outsiders, threshold)
        report = replace(report, notes=[*report.notes, f"{shadows} shadow models"])
    if not parallel.leader():  # under torchrun, rank 0 writes the plot and the cache
        return report
    if plot is not None:
        from puma_cli.plots import save_roc

        fpr, tpr = roc_curve(members, outsiders)
        write_atomically({plot: lambda tmp: save_roc(tmp, fpr, tpr, report.auc, method)}, overwrite)
    notes = commit_all([cache])
    return replace(report, notes=[*report.notes, *notes]) if notes else report


def _nonmembers(checkpoint: ckpt.Checkpoint, model: Path, nonmembers: Path | None) -> Dataset:
    if nonmembers is not None:
        return recorded.load_compatible(checkpoint, nonmembers)
    test = recorded.load_recorded_or_none(checkpoint, "test")
    if test is not None:
        return test
    raise PumaError(f"{model} records no test file; give non-members with --nonmembers FILE")
