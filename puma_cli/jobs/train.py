"""`puma train`: data in, one checkpoint out (with a SISA plan or an Amnesiac sidecar)."""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puma_cli.data.dataset import Dataset, split_rows, trained_rows_warning
from puma_cli.devices import device_memory
from puma_cli.errors import DataError, PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io.atomic import Writer, check_outputs, write_atomically
from puma_cli.io.columns import align_classes, align_features
from puma_cli.io.datasets import DataOptions, load_dataset
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.models.architectures import Model, frozen_parameters
from puma_cli.models.predict import Phases, phase_teller
from puma_cli.models.recipe import TrainRecipe, mixing_warnings
from puma_cli.models.training import Progress, batch_bounds, train_classifier
from puma_cli.quality.evaluation import Evaluation, evaluate_each, near_chance
from puma_cli.unlearn.amnesiac import UpdateRecorder


@dataclass(frozen=True)
class TrainReport:
    model: Path
    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float | None
    n_train: int
    n_val: int
    n_parameters: int
    frozen_parameters: int | None  # of n_parameters, where some are (requires_grad False)
    seconds: float
    shards: int = 1
    updates_file: Path | None = None
    updates_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)


def class_count(dataset: Dataset) -> int:
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
    phases: Phases | None = None,
    class_weight: str = "",
) -> TrainReport:
    """Train on `data` less a held-out validation split, record everything, save atomically.

    recipe.shards > 1 trains a SISA ensemble; record_updates keeps every step's update in
    a sidecar for Amnesiac; group names ids to train together (fewest batches or shards).
    """
    started = time.perf_counter()
    _check_options(recipe, val_frac, record_updates, group)
    sidecar = updates_path_for(output) if record_updates else None
    check_outputs([output, sidecar], [data, val, test, group], overwrite)
    dataset = load_dataset(data, options.label_col, options.id_col, phases=phases)
    n_classes = class_count(dataset)
    roles = np.full(len(dataset), ckpt.ROLE_TRAINED, dtype=np.uint8)
    val_set: Dataset | None = None
    if val is not None:
        val_set = load_for(val, dataset, options, n_classes, phases)
    elif val_frac > 0:
        _, held = split_rows(dataset.y, val_frac, recipe.seed)
        roles[held] = ckpt.ROLE_VALIDATION
        val_set = dataset.subset(held) if held.size else None
    test_set = load_for(test, dataset, options, n_classes, phases) if test is not None else None
    trained_rows = np.flatnonzero(roles == ckpt.ROLE_TRAINED)
    trained = dataset.subset(trained_rows)
    recipe = recipe.with_class_weights(class_weight, trained.y, n_classes)
    grouped = _group_positions(group, dataset, trained_rows) if group is not None else None
    fitted = _fit(
        trained, trained_rows, len(dataset), recipe, n_classes, device, progress, grouped, sidecar
    )
    model = fitted.model
    measured = [trained, *(d for d in (val_set, test_set) if d is not None)]
    found = iter(evaluate_each(model, measured, phase_teller(phases, "figures")))
    metrics: dict[str, Any] = {"train": figures(next(found))}
    if val_set is not None:
        metrics["val"] = figures(next(found))
    if test_set is not None:
        metrics["test"] = figures(next(found))
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
        feature_names_given=dataset.named_features,
        class_names=dataset.class_names,
        metrics=metrics,
        extra=fitted.extra,
        sidecars=fitted.sidecars,
    )
    write_atomically(
        {**fitted.writers, output: partial(ckpt.write_checkpoint, checkpoint)}, overwrite
    )
    return TrainReport(
        model=output,
        train_accuracy=metrics["train"]["accuracy"],
        val_accuracy=metrics["val"]["accuracy"] if "val" in metrics else None,
        test_accuracy=metrics["test"]["accuracy"] if "test" in metrics else None,
        n_train=len(trained),
        n_val=len(val_set) if val_set is not None else 0,
        n_parameters=sum(p.numel() for p in model.parameters()),
        frozen_parameters=frozen_parameters(model) or None,
        seconds=time.perf_counter() - started,
        shards=recipe.shards,
        updates_file=sidecar,
        updates_bytes=sidecar.stat().st_size if sidecar is not None else None,
        warnings=[
            *_learnt_nothing(metrics["train"]["accuracy"], trained.y, n_classes, recipe),
            *mixing_warnings(dataset, recipe),
            *(
                trained_rows_warning(dataset, trained_rows, val_set, "--val")
                if val is not None and val_set is not None
                else []
            ),
            *(
                trained_rows_warning(dataset, trained_rows, test_set, "--test")
                if test_set is not None
                else []
            ),
        ],
    )


def _check_options(
    recipe: TrainRecipe, val_frac: float, record_updates: bool, group: Path | None
) -> None:
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


@dataclass
class _Fitted:
    """The trained model, the tensors a SISA plan adds to the checkpoint, and Amnesiac's
    updates sidecar: its writer and its record."""

    model: Model
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    writers: dict[Path, Writer] = field(default_factory=dict)
    sidecars: dict[str, ckpt.DataRecord] = field(default_factory=dict)


def _fit(
    trained: Dataset,
    trained_rows: np.ndarray,
    n_rows: int,
    recipe: TrainRecipe,
    n_classes: int,
    device: torch.device | str,
    progress: Progress | None,
    grouped: np.ndarray | None,
    sidecar: Path | None,
) -> _Fitted:
    """A SISA ensemble (recipe.shards > 1) or one model, its every update recorded for
    Amnesiac where `sidecar` names the file they go to."""
    if recipe.shards > 1:
        from puma_cli.models.shards import train_sisa

        sisa = train_sisa(trained, recipe, n_classes, device, progress, grouped)
        return _Fitted(sisa.model, extra=sisa.plan.expanded(trained_rows, n_rows).to_tensors())
    recorder = None
    if sidecar is not None:
        steps = recipe.epochs * len(batch_bounds(len(trained), recipe.batch_size))
        recorder = UpdateRecorder(
            trained_rows,
            recipe.batch_size,
            steps,
            memory=device_memory(torch.device("cpu")),
            disk=shutil.disk_usage(sidecar.resolve().parent).free,
        )
    model = train_classifier(
        trained, recipe, n_classes, device, progress, group=grouped, on_step=recorder
    )
    fitted = _Fitted(model)
    if recorder is not None and sidecar is not None:
        digest = hashlib.sha256()
        for piece in recorder.pieces():
            digest.update(piece)
        # the pieces made as the writer runs: a generator bound now would serve once
        fitted.writers[sidecar] = lambda tmp: ckpt.write_pieces(recorder.pieces(), tmp)
        fitted.sidecars["updates"] = ckpt.DataRecord(
            str(sidecar.resolve()), digest.hexdigest(), len(recorder.updates)
        )
    return fitted


def _learnt_nothing(
    accuracy: float, y: np.ndarray, n_classes: int, recipe: TrainRecipe
) -> list[str]:
    """A warning when the model does little better on the rows it was trained on than
    always answering the largest class. Under the default standardisation the likeliest
    cause is a network that scales its own inputs (x / 255, a Normalize), which then sees
    nearly the same values for every row."""
    majority = near_chance(accuracy, y, n_classes)
    if majority is None:
        return []
    fix = (
        "if your network scales or normalises its own inputs, train with --no-standardize "
        "(puma standardises them first by default); otherwise raise --epochs or --lr"
        if recipe.standardize
        else "raise --epochs or --lr, or check the labels"
    )
    return [
        f"the trained model classifies its training rows at {accuracy:.3f}, little better "
        f"than always answering the largest class ({majority:.3f}): {fix}"
    ]


def _group_positions(group: Path, dataset: Dataset, trained_rows: np.ndarray) -> np.ndarray:
    """Positions among the trained rows of the ids in `group` (validation rows drop out)."""
    ids = read_ids(group)
    if not ids:
        raise DataError(f"{group} names no ids; give the ids to train together")
    rows = rows_for_ids(dataset, ids, group)
    return np.flatnonzero(np.isin(trained_rows, rows))


def load_for(
    path: Path,
    train_set: Dataset,
    options: DataOptions,
    n_classes: int,
    phases: Phases | None = None,
) -> Dataset:
    """A validation or test file, checked against the training data's shape and classes."""
    other = load_dataset(
        path, options.label_col, options.id_col, train_set.class_names, phases=phases
    )
    if other.input_shape != train_set.input_shape:
        raise DataError(
            f"{path} has feature shape {other.input_shape}, but {train_set.name} has "
            f"{train_set.input_shape}; give files with the same columns"
        )
    owner = f"the training file {train_set.name}"
    other = align_features(other, train_set.feature_names, train_set.named_features, owner)
    other = align_classes(other, train_set.class_names, owner)
    if int(other.y.max()) >= n_classes:
        raise DataError(
            f"{path} has label {int(other.y.max())}, but {train_set.name} has classes "
            f"0..{n_classes - 1} only"
        )
    return other


def figures(evaluation: Evaluation) -> dict[str, float | int]:
    return {
        "accuracy": round(evaluation.accuracy, 6),
        "loss": round(evaluation.loss, 6),
        "ece": round(evaluation.ece, 6),
        "n": evaluation.n,
    }
