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
    pool_digest,
    shadows_beside,
    sorted_log_softmax,
)
from puma_cli.audit.shokri import shokri_scores
from puma_cli.data.dataset import Dataset
from puma_cli.errors import SEED_MAX, DataError, PumaError, require_range
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs, write_atomically
from puma_cli.io.cache import Cache, commit_all
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.models.architectures import Classifier
from puma_cli.models.predict import Phases, phase_teller, predict_logits
from puma_cli.unlearn import RemovalOptions, RemovalRequest, get_method

Progress = Callable[[int, int, float], None]
FEW_SHADOWS = 16  # the default; fewer leave each point's mean on a handful of models
SCORING = "scoring the model"  # the phase that runs the attacked model over its rows


def attack(
    model: Path,
    targets: Path,
    *,
    method: str = "loss",
    nonmembers: Path | None = None,
    shadows: int = FEW_SHADOWS,
    plot: Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    phases: Phases | None = None,
) -> AttackReport:
    """Attack the targets (ids of the recorded training file) against non-member data."""
    if method not in ATTACKS:
        raise PumaError(f"--attack {method!r}: choose {', '.join(ATTACKS)}")
    if method != "loss":
        require_range("--shadows", shadows, 2, MAX_SHADOWS)
    require_range("--seed", seed, 0, SEED_MAX)
    if plot is not None and method == "u-lira":
        raise PumaError(
            "--plot draws a membership ROC curve, which u-lira has none of: drop --plot"
        )
    check_outputs([plot], [model, targets, nonmembers], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    recorded.protect_recorded([plot], checkpoint)
    dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
    ids = read_ids(targets)
    if not ids:
        raise DataError(f"{targets} names no ids; give the ids to test for membership")
    target_rows = rows_for_ids(dataset, ids, targets)
    other = _nonmembers(checkpoint, model, nonmembers, phases)
    cache: Cache | None = None
    if method == "u-lira":
        report, cache = _ulira(checkpoint, model, dataset, other, target_rows, shadows, seed,
                               device, progress)  # fmt: skip
        members = outsiders = np.zeros(0)
    elif method == "loss":
        trained = dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
        report = loss_attack(checkpoint.model, dataset.subset(target_rows), other, trained,
                             phase_teller(phases, SCORING))  # fmt: skip
        if plot is not None:  # the scores again, for the curve only
            members = -per_point_loss(checkpoint.model, dataset.subset(target_rows))
            outsiders = -per_point_loss(checkpoint.model, other)
    else:
        pool = attack_pool(dataset, other)
        shadow_set, cache = shadows_beside(
            model, checkpoint, pool, len(dataset), shadows, seed, device, progress
        )
        logits = predict_logits(checkpoint.model, pool.X, tell=phase_teller(phases, SCORING))
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
        notes = list(report.notes)
        if shadows < FEW_SHADOWS:
            notes.append(
                f"only {shadows} shadow models: each point's mean rests on about "
                f"{max(1, shadows // 2)} of them a side; --shadows {FEW_SHADOWS} or more steadies "
                "the scores"
            )
        report = replace(report, notes=notes, shadows=shadows)
    never = (ckpt.ROLE_VALIDATION, ckpt.ROLE_WITHDRAWN)  # a removal may have withdrawn them
    held_out = int(np.isin(checkpoint.roles[target_rows], never).sum())
    if held_out and method != "u-lira":
        report = replace(report, notes=[*report.notes, _held_out_note(held_out, target_rows.size)])
    if nonmembers is not None:
        leaks = recorded.trained_on_warning(checkpoint, dataset, other, "--nonmembers")
        report = replace(report, notes=[*report.notes, *leaks])
    if not parallel.leader():  # under torchrun, rank 0 writes the plot and the cache
        return report
    if plot is not None:
        from puma_cli.plots import save_roc

        fpr, tpr = roc_curve(members, outsiders)
        write_atomically({plot: lambda tmp: save_roc(tmp, fpr, tpr, report.auc, method)}, overwrite)
    notes = commit_all([cache])
    return replace(report, notes=[*report.notes, *notes]) if notes else report


def _held_out_note(held_out: int, count: int) -> str:
    """Targets the model never trained on (its validation split, marked for removal or
    not) are non-members whatever was removed: an attack that finds them out of the
    model says nothing of a removal."""
    if held_out == count:
        which = "every target is a validation row"
    else:
        which = f"{held_out} of the {count} targets are validation rows"
    return (
        f"{which} the model was never trained on, a non-member whatever a removal did: "
        "leave them out of --targets to audit a removal"
    )


ULIRA_METHODS = ("puma", "influence", "retrain", "finetune", "neggrad", "random-labels",
                 "salun", "scrub", "ssd")  # fmt: skip


def _ulira(
    checkpoint: ckpt.Checkpoint,
    model: Path,
    dataset: Dataset,
    other: Dataset,
    target_rows: np.ndarray,
    shadows: int,
    seed: int,
    device: torch.device | str,
    progress: Progress | None,
) -> tuple[AttackReport, Cache]:
    """U-LiRA on the removal that made `model`: the same method and options applied to
    shadows that held each target, against shadows that never did (`audit.ulira`)."""
    from puma_cli.audit.ulira import (
        MIN_SHADOWS,
        forgetting_score,
        game_scores,
        model_scores,
        unlearned_shadows,
    )

    require_range("--shadows", shadows, MIN_SHADOWS, MAX_SHADOWS)
    removals = [e for e in checkpoint.provenance if e.get("op") == "remove"]
    if not removals:
        raise PumaError(
            f"--attack u-lira audits a removal, and {model} records none: give a model "
            "written by `puma remove` and the ids it removed"
        )
    entry = removals[-1]
    method = str(entry.get("method"))
    if method not in ULIRA_METHODS:
        raise PumaError(
            f"--attack u-lira repeats the removal on shadow models (single models of the "
            f"recipe), which --method {method} cannot run on; it audits "
            f"{', '.join(ULIRA_METHODS)}"
        )
    notes = []
    withdrawn = checkpoint.roles[target_rows] == ckpt.ROLE_WITHDRAWN
    if withdrawn.all():
        raise PumaError(
            f"every target is a validation row {model} was never trained on (the removal "
            "withdrew them from its criterion, nothing to unlearn): u-lira audits the removal "
            "of trained rows; give their ids"
        )
    if withdrawn.any():
        notes.append(
            f"{int(withdrawn.sum())} of the {target_rows.size} targets are validation rows the "
            "model was never trained on (the removal withdrew them from its criterion): left "
            f"out of the audit, which is of the {int((~withdrawn).sum())} rows it unlearned"
        )
        target_rows = target_rows[~withdrawn]
    still = int((checkpoint.roles[target_rows] != ckpt.ROLE_REMOVED).sum())
    if still:
        raise PumaError(
            f"{still} of the {target_rows.size} targets were not removed from {model}: "
            "u-lira audits a removal; give the ids file that `puma remove` was given"
        )
    if "options" not in entry:
        notes.append(
            "the removal's options were not recorded (an older puma): its defaults are used"
        )
    options = RemovalOptions.from_record(entry.get("options", {}))
    options = replace(options, seed=seed, cache=None, factor_cache=None)
    pool = attack_pool(dataset, other)
    key = pool_digest(pool, [method, options.recordable(), shadows, seed, target_rows.tolist(),
                             checkpoint.recipe])  # fmt: skip
    cache = Cache(model.parent / f"puma-ulira-{key}.safetensors")
    unlearn = _shadow_unlearner(checkpoint, pool, method, options, device, seed)
    found = unlearned_shadows(checkpoint, pool, target_rows, shadows, seed, device, unlearn,
                              cache, progress)  # fmt: skip
    unlearned, never = game_scores(found)
    report = score_report("u-lira", unlearned, never, 0.0)
    logits = predict_logits(checkpoint.model, pool.X[target_rows])
    phi = logit_confidence(logits, torch.as_tensor(pool.y[target_rows]))
    flagged = float((model_scores(found, phi) > 0).mean())
    score, _ = forgetting_score(found)
    per_side = shadows // 2
    notes.append(
        f"{shadows} shadow models, {per_side} a side per target, repeating --method {method}: "
        f"the scores are over {unlearned.size} unlearned and {never.size} never-trained "
        "(shadow, target) pairs; 0.5 accuracy and AUC mean indistinguishable from retraining"
    )
    if per_side < 16:
        notes.append(
            f"with {per_side} shadows a side the forgetting score is coarse and biased low "
            f"(epsilon cannot exceed {np.log(2 * (per_side + 1)):.2f}, and its noisy estimate "
            "runs high, even for retraining): compare it with `--method retrain`'s at the same "
            "--shadows, or give --shadows 32 or more"
        )
    report = replace(report, notes=[*report.notes, *notes], forgetting_score=score,
                     model_flagged=flagged)  # fmt: skip
    return report, cache


def _shadow_unlearner(
    checkpoint: ckpt.Checkpoint,
    pool: Dataset,
    method: str,
    options: RemovalOptions,
    device: torch.device | str,
    seed: int,
) -> Callable[[torch.nn.Module, np.ndarray, np.ndarray], torch.nn.Module]:
    """The removal under audit, for a shadow trained on `rows` of the pool: its criterion
    (PUMA's held-out data) is a tenth as many rows the shadow never saw, targets excluded."""
    run = get_method(method)
    rng = np.random.default_rng(seed)

    def unlearn(shadow: torch.nn.Module, rows: np.ndarray, held: np.ndarray) -> torch.nn.Module:
        assert isinstance(shadow, Classifier)
        roles = np.full(len(pool), ckpt.ROLE_VALIDATION, dtype=checkpoint.roles.dtype)
        roles[rows] = ckpt.ROLE_TRAINED
        outside = np.setdiff1d(np.flatnonzero(roles != ckpt.ROLE_TRAINED), held)
        picked = rng.choice(outside, max(1, min(outside.size, rows.size // 9)), replace=False)
        own = replace(checkpoint, model=shadow, roles=roles, path=None, provenance=[],
                      extra={}, sidecars={})  # fmt: skip
        request = RemovalRequest(own, pool, held, pool.subset(np.sort(picked)), options, device)
        return run(request).model

    return unlearn


def _nonmembers(
    checkpoint: ckpt.Checkpoint, model: Path, nonmembers: Path | None, phases: Phases | None
) -> Dataset:
    if nonmembers is not None:
        return recorded.load_compatible(checkpoint, nonmembers, phases)
    test = recorded.load_recorded_or_none(checkpoint, "test", phases)
    if test is not None:
        return test
    raise PumaError(f"{model} records no test file; give non-members with --nonmembers FILE")
