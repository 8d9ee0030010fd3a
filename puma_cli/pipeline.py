"""File-to-file operations, one per command: read inputs, call the library, write outputs.

Each returns a report dataclass for the CLI to render. Outputs are checked before any
work starts and written atomically; inputs are only read.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puma_cli import checkpoint as ckpt
from puma_cli.atomic import check_outputs, check_writable, write_atomically
from puma_cli.criterion import cache_path_for
from puma_cli.data import Dataset, load_dataset, read_ids, rows_for_ids, save_dataset, split_rows
from puma_cli.data import write_ids as write_ids_file
from puma_cli.errors import DataError, PumaError
from puma_cli.evaluation import Evaluation, evaluate
from puma_cli.marking import all_classes_marking, check_marking, kmeans_marking, random_marking
from puma_cli.models import Model
from puma_cli.synthetic import flip_labels, make_synthetic
from puma_cli.train import Progress, TrainRecipe, train_classifier
from puma_cli.unlearn import RemovalOptions, RemovalRequest, get_method
from puma_cli.unlearn.amnesiac import UpdateRecorder

# --- make-data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MakeDataReport:
    path: Path
    n: int
    n_classes: int
    test_path: Path | None = None
    n_test: int = 0
    flipped_path: Path | None = None
    n_flipped: int = 0


def sibling(path: Path, tag: str, suffix: str | None = None) -> Path:
    """radial.csv, 'test' -> radial-test.csv."""
    return path.with_name(f"{path.stem}-{tag}{suffix if suffix is not None else path.suffix}")


def make_data(
    kind: str,
    output: Path,
    *,
    n: int | None = None,
    noise: float | None = None,
    seed: int = 0,
    test_frac: float = 0.0,
    flip_frac: float = 0.0,
    overwrite: bool = False,
) -> MakeDataReport:
    """Write a synthetic set; with test_frac a stratified test file beside it; with flip_frac
    the training labels get flipped and the flipped ids go to `<stem>-flipped.txt`."""
    if not 0 <= test_frac < 1:
        raise PumaError(f"--test-frac {test_frac} is out of range; give a fraction in [0, 1)")
    test_path = sibling(output, "test") if test_frac > 0 else None
    flipped_path = sibling(output, "flipped", ".txt") if flip_frac > 0 else None
    outputs = [p for p in (output, test_path, flipped_path) if p is not None]
    check_writable(outputs, overwrite)
    full = make_synthetic(kind, n, noise, seed)
    train, test = full, None
    if test_frac > 0:
        kept, held = split_rows(full.y, test_frac, seed)
        train, test = full.subset(kept), full.subset(held)
    flipped = np.array([], dtype=np.int64)
    if flip_frac > 0:
        train, flipped = flip_labels(train, flip_frac, seed)
    writers = {output: lambda tmp: save_dataset(tmp, train)}
    if test is not None and test_path is not None:
        writers[test_path] = lambda tmp: save_dataset(tmp, test)
    if flipped_path is not None:
        note = f"ids of {output.name} whose labels puma make-data flipped (seed {seed})"
        writers[flipped_path] = lambda tmp: write_ids_file(tmp, train.ids[flipped].tolist(), note)
    write_atomically(writers, overwrite)
    return MakeDataReport(
        path=output,
        n=len(train),
        n_classes=full.n_classes,
        test_path=test_path,
        n_test=len(test) if test is not None else 0,
        flipped_path=flipped_path,
        n_flipped=int(flipped.size),
    )


# --- train -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    label_col: str = "label"
    id_col: str = "id"


@dataclass(frozen=True)
class TrainReport:
    model: Path
    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float | None
    n_train: int
    n_val: int
    n_parameters: int
    seconds: float
    shards: int = 1
    updates_file: Path | None = None
    updates_bytes: int | None = None


def _n_classes(dataset: Dataset) -> int:
    k = dataset.n_classes
    missing = sorted(set(range(k)) - {int(c) for c in np.unique(dataset.y)})
    if missing and dataset.class_names is None:
        raise DataError(
            f"{dataset.name}: labels run up to {k - 1} but class {missing[0]} has no rows; "
            "labels must be 0..K-1 with every class present (renumber them)"
        )
    return k


def updates_path_for(model: Path) -> Path:
    """m.safetensors -> m.updates.safetensors (Amnesiac's recorded training updates)."""
    return model.with_name(f"{model.stem}.updates.safetensors")


def train(
    data: Path,
    output: Path,
    recipe: TrainRecipe,
    *,
    val_frac: float = 0.1,
    val: Path | None = None,
    test: Path | None = None,
    group: Path | None = None,
    record_updates: bool = False,
    options: DataOptions = DataOptions(),
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TrainReport:
    """Train on `data` less a held-out validation split, record everything, save atomically.

    recipe.shards > 1 trains a SISA ensemble; record_updates keeps every step's update in
    a sidecar for Amnesiac; group names ids to train together (fewest batches or shards).
    """
    started = time.perf_counter()
    recipe.validate()
    if not 0 <= val_frac <= 0.5:
        raise PumaError(f"--val-frac {val_frac} is out of range; give a fraction in [0, 0.5]")
    if record_updates and recipe.shards > 1:
        raise PumaError(
            "--record-updates is for Amnesiac on a single model; a SISA ensemble (--shards) "
            "unlearns by retraining its shards: drop one of the two"
        )
    if group is not None and not (record_updates or recipe.shards > 1):
        raise PumaError(
            "--group-ids only changes how Amnesiac batches (--record-updates) or SISA shards "
            "(--shards K) hold those rows; add one of them or drop --group-ids"
        )
    sidecar = updates_path_for(output) if record_updates else None
    outputs = [output, sidecar]
    check_outputs(outputs, [data, val, test, group], overwrite)
    dataset = load_dataset(data, options.label_col, options.id_col)
    n_classes = _n_classes(dataset)
    roles = np.full(len(dataset), ckpt.ROLE_TRAINED, dtype=np.uint8)
    val_set: Dataset | None = None
    if val is not None:
        val_set = _load_for(val, dataset, options, n_classes)
    elif val_frac > 0:
        _, held = split_rows(dataset.y, val_frac, recipe.seed)
        roles[held] = ckpt.ROLE_VALIDATION
        val_set = dataset.subset(held) if held.size else None
    test_set = _load_for(test, dataset, options, n_classes) if test is not None else None
    trained_rows = np.flatnonzero(roles == ckpt.ROLE_TRAINED)
    trained = dataset.subset(trained_rows)
    grouped = _group_positions(group, dataset, trained_rows) if group is not None else None
    extra: dict[str, torch.Tensor] = {}
    writers = {}
    sidecars = {}
    if recipe.shards > 1:
        from puma_cli.sisa import train_sisa

        sisa = train_sisa(trained, recipe, n_classes, device, progress, grouped)
        model: Model = sisa.model
        extra = sisa.plan.expanded(trained_rows, len(dataset)).to_tensors()
    else:
        recorder = UpdateRecorder(trained_rows, recipe.batch_size) if record_updates else None
        model = train_classifier(
            trained, recipe, n_classes, device, progress, group=grouped, on_step=recorder
        )
        if recorder is not None and sidecar is not None:
            blob = ckpt.tensor_bytes(recorder.tensors())
            writers[sidecar] = lambda tmp: tmp.write_bytes(blob)
            digest = hashlib.sha256(blob).hexdigest()
            sidecars["updates"] = ckpt.DataRecord(
                str(sidecar.resolve()), digest, len(recorder.updates)
            )
    metrics: dict[str, Any] = {"train": _figures(evaluate(model, trained))}
    if val_set is not None:
        metrics["val"] = _figures(evaluate(model, val_set))
    if test_set is not None:
        metrics["test"] = _figures(evaluate(model, test_set))
    checkpoint = ckpt.Checkpoint(
        model=model,
        recipe=recipe.to_dict(),
        data={
            "train": ckpt.DataRecord.of(dataset, options.label_col, options.id_col),
            "val": ckpt.DataRecord.of(val_set, options.label_col, options.id_col)
            if val is not None and val_set is not None
            else None,
            "test": ckpt.DataRecord.of(test_set, options.label_col, options.id_col)
            if test_set is not None
            else None,
        },
        roles=roles,
        feature_names=dataset.feature_names,
        class_names=dataset.class_names,
        metrics=metrics,
        extra=extra,
        sidecars=sidecars,
    )
    blob_model = ckpt.checkpoint_bytes(checkpoint)
    writers[output] = lambda tmp: tmp.write_bytes(blob_model)
    write_atomically(writers, overwrite)
    return TrainReport(
        model=output,
        train_accuracy=metrics["train"]["accuracy"],
        val_accuracy=metrics["val"]["accuracy"] if "val" in metrics else None,
        test_accuracy=metrics["test"]["accuracy"] if "test" in metrics else None,
        n_train=len(trained),
        n_val=len(val_set) if val_set is not None else 0,
        n_parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - started,
        shards=recipe.shards,
        updates_file=sidecar,
        updates_bytes=sidecar.stat().st_size if sidecar is not None else None,
    )


def _group_positions(group: Path, dataset: Dataset, trained_rows: np.ndarray) -> np.ndarray:
    """Positions among the trained rows of the ids in `group` (validation rows drop out)."""
    ids = read_ids(group)
    if not ids:
        raise DataError(f"{group} names no ids; give the ids to train together")
    rows = rows_for_ids(dataset, ids, group)
    return np.flatnonzero(np.isin(trained_rows, rows))


def _load_for(path: Path, train_set: Dataset, options: DataOptions, n_classes: int) -> Dataset:
    """A validation or test file, checked against the training data's shape and classes."""
    other = load_dataset(path, options.label_col, options.id_col, train_set.class_names)
    if other.input_shape != train_set.input_shape:
        raise DataError(
            f"{path} has feature shape {other.input_shape}, but {train_set.name} has "
            f"{train_set.input_shape}; give files with the same columns"
        )
    if int(other.y.max()) >= n_classes:
        raise DataError(
            f"{path} has label {int(other.y.max())}, but {train_set.name} has classes "
            f"0..{n_classes - 1} only"
        )
    return other


def _figures(evaluation: Evaluation) -> dict[str, float | int]:
    return {
        "accuracy": round(evaluation.accuracy, 6),
        "loss": round(evaluation.loss, 6),
        "ece": round(evaluation.ece, 6),
        "n": evaluation.n,
    }


# --- mark --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkReport:
    ids_file: Path
    count: int
    n: int
    method: str


def mark(
    data: Path,
    output: Path,
    *,
    cls: int | None = None,
    clusters: int = 8,
    all_classes: bool = False,
    random_frac: float | None = None,
    seed: int = 0,
    options: DataOptions = DataOptions(),
    overwrite: bool = False,
) -> MarkReport:
    """Mark by k-means cluster (one class, or every class) or at random; write the ids."""
    chosen = [cls is not None, all_classes, random_frac is not None]
    if sum(chosen) != 1:
        raise PumaError("choose exactly one marking: --class Y, --all-classes or --random FRAC")
    check_outputs([output], [data], overwrite)
    dataset = load_dataset(data, options.label_col, options.id_col)
    if random_frac is not None:
        rows, method = random_marking(dataset, random_frac, seed), f"random {random_frac}"
    elif all_classes:
        rows = all_classes_marking(dataset, clusters, seed)
        method = f"kmeans all classes, {clusters} clusters"
    else:
        assert cls is not None
        rows = kmeans_marking(dataset, cls, clusters, seed)
        method = f"kmeans class {cls}, {clusters} clusters"
    check_marking(rows, dataset)
    ids = dataset.ids[np.sort(rows)].tolist()
    note = (
        f"puma mark: {method}, seed {seed}, {len(ids)} of {len(dataset)} rows\n"
        f"data: {data.name} sha256 {dataset.sha256}"
    )
    write_atomically({output: lambda tmp: write_ids_file(tmp, ids, note)}, overwrite)
    return MarkReport(ids_file=output, count=len(ids), n=len(dataset), method=method)


# --- eval --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    evaluation: Evaluation
    data: Path
    ids_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ROLES = ("train", "val", "test")


def evaluate_model(
    model: Path,
    *,
    data: Path | None = None,
    on: str | None = None,
    ids: Path | None = None,
    bins: int = 15,
    options: DataOptions | None = None,
    device: torch.device | str = "cpu",
) -> EvalReport:
    """Evaluate on a file, or on a file the checkpoint recorded (`on`: train, val or test)."""
    if bins < 1:
        raise PumaError(f"--bins {bins}: give 1 or more")
    checkpoint = ckpt.load_checkpoint(model, device)
    dataset = _eval_dataset(checkpoint, data, on, options)
    ckpt.check_compatible(checkpoint, dataset)
    if ids is not None:
        wanted = read_ids(ids)
        if not wanted:
            raise DataError(f"{ids} names no ids; give at least one id")
        dataset = dataset.subset(rows_for_ids(dataset, wanted, ids))
    assert dataset.path is not None
    return EvalReport(evaluate(checkpoint.model, dataset, bins), dataset.path, ids)


def _eval_dataset(
    checkpoint: ckpt.Checkpoint, data: Path | None, on: str | None, options: DataOptions | None
) -> Dataset:
    if data is not None and on is not None:
        raise PumaError("give --data FILE or --on train|val|test, not both")
    if data is not None:
        train_record = checkpoint.data.get("train")
        opts = options or (
            DataOptions(train_record.label_col, train_record.id_col)
            if train_record
            else DataOptions()
        )
        return load_dataset(data, opts.label_col, opts.id_col, checkpoint.class_names)
    role = on or ("test" if checkpoint.data.get("test") else None)
    if role is None:
        raise PumaError(
            f"{checkpoint.path} records no test file; give --data FILE or --on train|val"
        )
    if role not in ROLES:
        raise PumaError(f"--on {role!r}: choose train, val or test")
    if role == "val" and checkpoint.data.get("val") is None:
        dataset = ckpt.load_recorded_dataset(checkpoint, "train")
        rows = np.flatnonzero(checkpoint.roles == ckpt.ROLE_VALIDATION)
        if rows.size == 0:
            raise PumaError(f"{checkpoint.path} was trained without a validation split")
        return dataset.subset(rows)
    dataset = ckpt.load_recorded_dataset(checkpoint, role)
    if role == "train":
        return dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
    return dataset


# --- info --------------------------------------------------------------------------------


def describe(model: Path) -> dict[str, Any]:
    """The checkpoint's metadata, with the state of each recorded data file."""
    checkpoint = ckpt.load_checkpoint(model)
    info = checkpoint.metadata()
    info["model"] = str(model)
    info["data_status"] = ckpt.data_status(checkpoint)
    return info


# --- remove ------------------------------------------------------------------------------


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
) -> RemoveReport:
    """Remove the marked ids' influence from `model`; write the result with its provenance."""
    output = output or default_removed_path(model)
    check_outputs([output], [model, marked], overwrite)
    run = get_method(method)
    checkpoint = ckpt.load_checkpoint(model, device)
    dataset = ckpt.load_recorded_dataset(checkpoint, "train")
    ids = read_ids(marked)
    rows, trained_marked, skipped = _marked_rows(checkpoint, dataset, ids, marked)
    new_roles = checkpoint.roles.copy()
    new_roles[rows] = ckpt.ROLE_REMOVED
    criterion = criterion_set(checkpoint, dataset, new_roles, criterion_data)
    test_set = ckpt.load_recorded_or_none(checkpoint, "test")
    marked_set = dataset.subset(trained_marked)
    options = options or RemovalOptions()
    if use_cache and method in ("puma", "influence"):
        options = replace(options, cache=cache_path_for(model))
    request = RemovalRequest(
        checkpoint, dataset, trained_marked, criterion, options, device, progress
    )
    before_c, before_m = (
        evaluate(checkpoint.model, criterion),
        evaluate(checkpoint.model, marked_set),
    )
    test_before = evaluate(checkpoint.model, test_set).accuracy if test_set is not None else None
    started = time.perf_counter()
    result = run(request)
    seconds = time.perf_counter() - started
    if not all(torch.isfinite(p).all() for p in result.model.parameters()):
        raise PumaError(f"--method {method} produced NaN or inf weights; nothing was written")
    after_c, after_m = evaluate(result.model, criterion), evaluate(result.model, marked_set)
    test_after = evaluate(result.model, test_set).accuracy if test_set is not None else None
    warnings = list(result.warnings)
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
    entry = _provenance_entry(report, ids)
    new = replace(
        checkpoint,
        model=result.model,
        roles=new_roles,
        provenance=[*checkpoint.provenance, entry],
        extra=result.extra if result.extra is not None else checkpoint.extra,
    )
    ckpt.save_checkpoint(output, new, overwrite)
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
        "already_removed": int((roles == ckpt.ROLE_REMOVED).sum()),
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


def _provenance_entry(report: RemoveReport, ids: list[str]) -> dict[str, Any]:
    """What the checkpoint keeps of a removal: never the ids, only their count and sha256."""
    return {
        "op": "remove",
        "method": report.method,
        "parameters": report.parameters,
        "removed": report.removed,
        "ids_count": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 4),
        "metrics": {key: getattr(report, key) for key in _RECORDED_METRICS},
        "warnings": report.warnings,
    }


def criterion_set(
    checkpoint: ckpt.Checkpoint, dataset: Dataset, roles: np.ndarray, criterion_data: Path | None
) -> Dataset:
    """Held-out data for C: --criterion-data, else the recorded validation file or rows."""
    if criterion_data is not None:
        return ckpt.load_compatible(checkpoint, criterion_data)
    if checkpoint.data.get("val") is not None:
        return ckpt.load_recorded_dataset(checkpoint, "val")
    rows = np.flatnonzero(roles == ckpt.ROLE_VALIDATION)
    if rows.size == 0:
        raise PumaError(
            f"{checkpoint.path} has no held-out validation data for the criterion C; "
            "pass --criterion-data FILE or retrain with --val-frac 0.1"
        )
    return dataset.subset(rows)
