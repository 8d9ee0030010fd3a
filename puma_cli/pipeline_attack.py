"""`attack` from files: targets from the recorded training file, non-members from a file.

LiRA's shadow models depend only on the data pool, the recipe, their number and the seed,
not on the attacked model, so their predictions are cached beside the checkpoint under a
name derived from those: an attack on the unlearned model reuses the original's shadows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puma_cli import checkpoint as ckpt
from puma_cli.atomic import check_outputs, write_atomically
from puma_cli.attacks import (
    ATTACKS,
    AttackReport,
    ShadowSet,
    lira_scores,
    logit_confidence,
    loss_attack,
    per_point_loss,
    roc_curve,
    score_report,
    shokri_scores,
    sorted_log_softmax,
)
from puma_cli.data import Dataset, read_ids, rows_for_ids
from puma_cli.errors import DataError, PumaError
from puma_cli.evaluation import predict_logits
from puma_cli.train import TrainRecipe, train_model

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
    check_outputs([plot], [model, targets, nonmembers], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    dataset = ckpt.load_recorded_dataset(checkpoint, "train")
    ids = read_ids(targets)
    if not ids:
        raise DataError(f"{targets} names no ids; give the ids to test for membership")
    target_rows = rows_for_ids(dataset, ids, targets)
    other = _nonmembers(checkpoint, model, nonmembers)
    if method == "loss":
        trained = dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
        report = loss_attack(checkpoint.model, dataset.subset(target_rows), other, trained)
        if plot is not None:  # the scores again, for the curve only
            members = -per_point_loss(checkpoint.model, dataset.subset(target_rows))
            outsiders = -per_point_loss(checkpoint.model, other)
    else:
        if shadows < 2:
            raise PumaError(f"--shadows {shadows}: {method} needs at least 2 shadow models")
        pool = _pool(dataset, other)
        # The training-set size as first trained (recorded), so that every model in a
        # removal chain shares one set of shadows.
        size = int(checkpoint.metrics.get("train", {}).get("n", len(dataset)))
        shadow_set = _shadows(checkpoint, pool, shadows, size, seed, model.parent, device, progress)
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
    if plot is not None:
        from puma_cli.plots import save_roc

        fpr, tpr = roc_curve(members, outsiders)
        write_atomically({plot: lambda tmp: save_roc(tmp, fpr, tpr, report.auc, method)}, overwrite)
    return report


def _nonmembers(checkpoint: ckpt.Checkpoint, model: Path, nonmembers: Path | None) -> Dataset:
    if nonmembers is not None:
        return ckpt.load_compatible(checkpoint, nonmembers)
    test = ckpt.load_recorded_or_none(checkpoint, "test")
    if test is not None:
        return test
    raise PumaError(f"{model} records no test file; give non-members with --nonmembers FILE")


def _pool(dataset: Dataset, other: Dataset) -> Dataset:
    """The attacker's data: every row of the training file, then the non-members. It does
    not depend on which rows a model still trains on, so a removal keeps the same shadows."""
    return replace(
        dataset,
        X=np.concatenate([dataset.X, other.X]),
        y=np.concatenate([dataset.y, other.y]),
        ids=np.concatenate([dataset.ids, np.array([f"nonmember:{i}" for i in other.ids])]),
    )


def _shadows(
    checkpoint: ckpt.Checkpoint,
    pool: Dataset,
    count: int,
    size: int,
    seed: int,
    folder: Path,
    device: torch.device | str,
    progress: Progress | None,
) -> ShadowSet:
    """Shadow models on random subsets of the pool, each of about `size` rows (the attacked
    model's training-set size: a shadow trained on less data is less confident, and every
    point would look like a member); their phi on every pool point (cached)."""
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    digest = hashlib.sha256()
    for array in (pool.X, pool.y):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps([recipe.to_dict(), count, size, seed], sort_keys=True).encode())
    cache = folder / f"puma-shadows-{digest.hexdigest()[:16]}.safetensors"
    if cache.exists():
        try:
            tensors = load_file(str(cache))
            return ShadowSet(
                tensors["inclusion"].numpy().astype(bool),
                tensors["phi"].numpy(),
                tensors["sorted_logp"].numpy(),
            )
        except (SafetensorError, OSError, KeyError):
            pass  # rebuilt below
    # Every point is in the same number of shadows (LiRA's design, with the share set by
    # `size`), at least one and at most count - 1, so each has an IN and an OUT side.
    rng = np.random.default_rng(seed)
    inside = min(max(round(count * size / len(pool)), 1), count - 1)
    ranks = np.argsort(rng.random((count, len(pool))), axis=0)
    inclusion = ranks < inside
    phi = np.empty((count, len(pool)))
    sorted_logp = np.empty((count, len(pool), checkpoint.arch.n_classes), dtype=np.float32)
    labels = torch.as_tensor(pool.y)
    for s in range(count):
        shadow = train_model(
            pool.subset(np.flatnonzero(inclusion[s])),
            replace(recipe, seed=recipe.seed + 1 + s),
            checkpoint.arch.n_classes,
            device,
        )
        logits = predict_logits(shadow, pool.X)
        phi[s] = logit_confidence(logits, labels)
        sorted_logp[s] = sorted_log_softmax(logits)
        if progress is not None:
            progress(s + 1, count, 0.0)
    tmp = cache.with_name(f".{cache.name}.tmp")
    try:
        save_file(
            {
                "inclusion": torch.from_numpy(inclusion.astype(np.uint8)),
                "phi": torch.from_numpy(phi),
                "sorted_logp": torch.from_numpy(sorted_logp),
            },
            str(tmp),
        )
        tmp.replace(cache)
    except OSError:
        tmp.unlink(missing_ok=True)
    return ShadowSet(inclusion, phi, sorted_logp)
