"""`puma remove`: a checkpoint and an ids file in, the unlearned checkpoint out.

The method (puma, influence, retrain, sisa, amnesiac, ssd) comes from the `unlearn`
registry; this job finds the recorded data, checks the marking, measures before and
after, refuses a model with NaN or inf weights, and appends the provenance entry.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puma_cli import parallel
from puma_cli.data.dataset import Dataset, rows_digest
from puma_cli.engine.criterion import EngineCaches
from puma_cli.engine.derivatives import Phases
from puma_cli.errors import DataError, PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs
from puma_cli.io.cache import commit_all
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.io.recorded import criterion_set
from puma_cli.models.predict import phase_teller
from puma_cli.models.training import Progress
from puma_cli.quality.evaluation import evaluate, evaluate_each
from puma_cli.unlearn import RemovalOptions, RemovalRequest, get_method


@dataclass(frozen=True)
class RemoveReport:
    method: str
    removed: int
    seconds: float
    output: Path
    eta: float | None
    eta_scale: float | None
    predicted_criterion_change: float | None
    criterion_before: float
    criterion_after: float
    criterion_accuracy_before: float
    criterion_accuracy_after: float
    test_accuracy_before: float | None
    test_accuracy_after: float | None
    marked_loss_before: float
    marked_loss_after: float
    marked_accuracy_before: float
    marked_accuracy_after: float
    cached: bool
    parameters: dict[str, Any]
    warnings: list[str]
    skipped: dict[str, int]


PARALLEL_METHODS = ("puma", "influence")  # the engine's methods: rows split, sums shared


def default_removed_path(model: Path) -> Path:
    return model.with_name(f"{model.stem}.removed.safetensors")


def remove(
    model: Path,
    marked: Path,
    output: Path | None = None,
    *,
    method: str = "puma",
    options: RemovalOptions | None = None,
    criterion_data: Path | None = None,
    use_cache: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    phases: Phases | None = None,
) -> RemoveReport:
    """Remove the marked ids' influence from `model`; write the result with its provenance."""
    options = options or RemovalOptions()
    options.validate()
    output = output or default_removed_path(model)
    check_outputs([output], [model, marked, criterion_data], overwrite)
    run = get_method(method)
    if parallel.size() > 1 and method not in PARALLEL_METHODS:
        raise PumaError(
            f"--method {method} does not split over processes (torchrun runs "
            f"{', '.join(PARALLEL_METHODS)}): run it without torchrun"
        )
    checkpoint = ckpt.load_checkpoint(model, device)
    recorded.protect_recorded([output], checkpoint)
    dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
    ids = read_ids(marked)
    rows, trained_marked, skipped = _marked_rows(checkpoint, dataset, ids, marked)
    new_roles = checkpoint.roles.copy()
    new_roles[trained_marked] = ckpt.ROLE_REMOVED
    new_roles[rows[checkpoint.roles[rows] == ckpt.ROLE_VALIDATION]] = ckpt.ROLE_WITHDRAWN
    criterion = criterion_set(checkpoint, dataset, new_roles, criterion_data, phases)
    test_set = recorded.load_recorded_or_none(checkpoint, "test", phases)
    marked_set = dataset.subset(trained_marked)
    if use_cache and method in ("puma", "influence"):
        caches = EngineCaches.beside(model)
        options = replace(options, cache=caches.direction, factor_cache=caches.factors)
    request = RemovalRequest(
        checkpoint, dataset, trained_marked, criterion, options, device, progress, phases
    )
    measured = [criterion, marked_set, *([test_set] if test_set is not None else [])]
    before_c, before_m, *before_t = evaluate_each(
        checkpoint.model, measured, phase_teller(phases, "figures before")
    )
    test_before = before_t[0].accuracy if before_t else None
    started = time.perf_counter()
    result = run(request)
    seconds = time.perf_counter() - started
    if not all(torch.isfinite(p).all() for p in result.model.parameters()):
        raise PumaError(f"--method {method} produced NaN or inf weights; nothing was written")
    after_c, after_m, *after_t = evaluate_each(
        result.model, measured, phase_teller(phases, "figures after")
    )
    test_after = after_t[0].accuracy if after_t else None
    warnings = list(result.warnings)
    if criterion_data is not None:
        warnings += recorded.trained_on_warning(checkpoint, dataset, criterion, "--criterion-data")
    whole = _whole_classes(checkpoint, dataset, trained_marked)
    if whole:
        of_class = np.isin(dataset.y[trained_marked], list(whole))
        kept = (  # the classes' own rows: other marked rows a retrain predicts as well
            after_m.accuracy
            if of_class.all()
            else evaluate(result.model, dataset.subset(trained_marked[of_class])).accuracy
        )
        if kept >= WHOLE_CLASS_KEPT:
            warnings.append(_whole_class_warning(list(whole.values()), kept, method))
    if test_before is not None and test_after is not None and test_before - test_after > 0.01:
        warnings.append(
            f"test accuracy fell by {100 * (test_before - test_after):.1f} points "
            f"({test_before:.4f} -> {test_after:.4f})"
        )
    report = RemoveReport(
        method=result.method,
        removed=int(trained_marked.size),
        seconds=seconds,
        output=output,
        eta=result.eta,
        eta_scale=result.parameters.get("eta_scale"),
        predicted_criterion_change=result.predicted_criterion_change,
        criterion_before=before_c.loss,
        criterion_after=after_c.loss,
        criterion_accuracy_before=before_c.accuracy,
        criterion_accuracy_after=after_c.accuracy,
        test_accuracy_before=test_before,
        test_accuracy_after=test_after,
        marked_loss_before=before_m.loss,
        marked_loss_after=after_m.loss,
        marked_accuracy_before=before_m.accuracy,
        marked_accuracy_after=after_m.accuracy,
        cached=result.cached,
        parameters=result.parameters,
        warnings=warnings,
        skipped=skipped,
    )
    held = rows_digest(dataset, np.flatnonzero(~np.isin(new_roles, ckpt.GONE)))
    entry = _provenance_entry(report, ids, options, held)
    new = replace(
        checkpoint,
        model=result.model,
        roles=new_roles,
        provenance=[*checkpoint.provenance, entry],
        extra=result.extra if result.extra is not None else checkpoint.extra,
    )
    if parallel.leader():  # under torchrun, every process holds the same model
        ckpt.save_checkpoint(output, new, overwrite)
        report.warnings.extend(commit_all([options.cache, options.factor_cache]))
    return report


def _marked_rows(
    checkpoint: ckpt.Checkpoint, dataset: Dataset, ids: list[str], marked: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(all marked rows, those trained on now, counts of the others by why they are skipped).

    Marked validation rows are dropped from the criterion too; rows removed earlier stay so.
    """
    if not ids:
        raise DataError(f"{marked} names no ids; give at least one id to remove")
    rows = rows_for_ids(dataset, ids, marked)
    roles = checkpoint.roles[rows]
    trained = rows[roles == ckpt.ROLE_TRAINED]
    skipped = {
        "already_removed": int(np.isin(roles, ckpt.GONE).sum()),
        "validation": int((roles == ckpt.ROLE_VALIDATION).sum()),
    }
    if trained.size == 0:
        raise PumaError(
            f"none of the {len(ids)} ids in {marked} is trained on by {checkpoint.path} "
            f"({skipped['already_removed']} removed earlier, {skipped['validation']} validation "
            "rows); nothing to remove"
        )
    if int((checkpoint.roles == ckpt.ROLE_TRAINED).sum()) == trained.size:
        raise PumaError(
            f"{marked} marks every one of the {trained.size} rows {checkpoint.path} is trained "
            "on; nothing would remain: mark fewer points"
        )
    return rows, trained, skipped


# A removal of a whole class that still classifies this share of the marked rows right
# is said to keep the class.
WHOLE_CLASS_KEPT = 0.5


def _whole_classes(
    checkpoint: ckpt.Checkpoint, dataset: Dataset, marked: np.ndarray
) -> dict[int, str]:
    """The classes the marking holds every row of that the model is trained on: label ->
    its name where the data names them, else its number."""
    trained = checkpoint.roles == ckpt.ROLE_TRAINED
    is_marked = np.zeros(len(dataset), dtype=bool)
    is_marked[marked] = True
    whole = {}
    for k in np.unique(dataset.y[marked]):
        if is_marked[trained & (dataset.y == k)].all():
            names = dataset.class_names
            whole[int(k)] = repr(names[k]) if names is not None else str(int(k))
    return whole


def _whole_class_warning(classes: list[str], accuracy: float, method: str) -> str:
    which = f"class {classes[0]}" if len(classes) == 1 else f"classes {', '.join(classes)}"
    why = (
        "PUMA keeps held-out performance, the class's included (README: \"Forgetting a "
        'whole class"); '
        if method in ("puma", "influence")
        else ""
    )
    return (
        f"the marking holds every trained row of {which}, which a model retrained without "
        f"them cannot predict, but the removed model still classifies {accuracy:.1%} of "
        f"those rows right: {why}to forget a whole class, --method scrub or salun, a "
        "longer first-order step (--method influence --eta 64), or --method retrain"
    )


_RECORDED_METRICS = (
    "predicted_criterion_change",
    "criterion_before",
    "criterion_after",
    "criterion_accuracy_before",
    "criterion_accuracy_after",
    "test_accuracy_before",
    "test_accuracy_after",
    "marked_loss_before",
    "marked_loss_after",
)


def _provenance_entry(
    report: RemoveReport, ids: list[str], options: RemovalOptions, held_rows_sha256: str
) -> dict[str, Any]:
    """What the checkpoint keeps of a removal: never the ids, only their count and sha256;
    the options as given, so that an audit (`attack --attack u-lira`) can repeat it; and
    the digest of the rows it keeps, which the file must hold once the removed rows are
    deleted from it (`puma relink`)."""
    return {
        "op": "remove",
        "method": report.method,
        "options": options.recordable(),
        "parameters": report.parameters,
        "removed": report.removed,
        "ids_count": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 4),
        "metrics": {key: getattr(report, key) for key in _RECORDED_METRICS},
        "warnings": report.warnings,
        "held_rows_sha256": held_rows_sha256,
    }
