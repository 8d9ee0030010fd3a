"""`puma eval`: accuracy, mean loss and ECE of a model on a file, or on some ids of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError, PumaError, require_range
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.datasets import DataOptions, load_dataset
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.models.predict import Phases, phase_teller
from puma_cli.quality.calibration import MAX_BINS
from puma_cli.quality.evaluation import Evaluation, evaluate


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
    phases: Phases | None = None,
) -> EvalReport:
    """Evaluate on a file, or on a file the checkpoint recorded (`on`: train, val or test)."""
    require_range("--bins", bins, 1, MAX_BINS)
    checkpoint = ckpt.load_checkpoint(model, device)
    dataset = _eval_dataset(checkpoint, data, on, options, ids is not None, phases)
    dataset = recorded.fit_to_model(checkpoint, dataset)
    if ids is not None:
        wanted = read_ids(ids)
        if not wanted:
            raise DataError(f"{ids} names no ids; give at least one id")
        dataset = dataset.subset(rows_for_ids(dataset, wanted, ids))
    assert dataset.path is not None
    found = evaluate(checkpoint.model, dataset, bins, phase_teller(phases, "figures"))
    return EvalReport(found, dataset.path, ids)


def _eval_dataset(
    checkpoint: ckpt.Checkpoint,
    data: Path | None,
    on: str | None,
    options: DataOptions | None,
    every_row: bool = False,
    phases: Phases | None = None,
) -> Dataset:
    """The data to evaluate on. `--on train` is the rows trained on, or with `every_row`
    (ids given) every row of the recorded training file: after a removal the marked rows
    are no longer trained on, and `--on train --ids marked.txt` is how one asks for them."""
    if data is not None and on is not None:
        raise PumaError("give --data FILE or --on train|val|test, not both")
    if data is not None:
        train_record = checkpoint.data.get("train")
        opts = options or (
            DataOptions(train_record.label_col, train_record.id_col)
            if train_record
            else DataOptions()
        )
        return load_dataset(
            data, opts.label_col, opts.id_col, checkpoint.class_names, phases=phases
        )
    role = on or ("test" if checkpoint.data.get("test") else None)
    if role is None:
        raise PumaError(
            f"{checkpoint.path} records no test file; give --data FILE or --on train|val"
        )
    if role not in ROLES:
        raise PumaError(f"--on {role!r}: choose train, val or test")
    if role == "val" and checkpoint.data.get("val") is None:
        dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
        rows = np.flatnonzero(checkpoint.roles == ckpt.ROLE_VALIDATION)
        if rows.size == 0:
            raise PumaError(f"{checkpoint.path} was trained without a validation split")
        return dataset.subset(rows)
    dataset = recorded.load_recorded_dataset(checkpoint, role, phases)
    if role == "train" and not every_row:
        return dataset.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED))
    return dataset
