"""The files a checkpoint records: found where they were, refused when changed.

A later command finds the training, validation and test data and the sidecar files
through the checkpoint's metadata, so `puma remove --model m.safetensors --marked ids`
needs no --data; a file whose sha256 differs from the recorded one is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from puma_cli.data.dataset import Dataset, trained_rows_warning
from puma_cli.errors import DataError, PumaError
from puma_cli.io.atomic import check_not_input, sha256_file, sha256_path
from puma_cli.io.checkpoint import (
    GONE,
    ROLE_TRAINED,
    ROLE_VALIDATION,
    ROLE_WITHDRAWN,
    Checkpoint,
)
from puma_cli.io.columns import align_classes, align_features
from puma_cli.io.datasets import load_dataset
from puma_cli.models.predict import Phases


def recorded_data_path(checkpoint: Checkpoint, role: str) -> Path:
    """The file recorded for `role` ('train', 'val', 'test'), found where it was recorded."""
    record = checkpoint.data.get(role)
    if record is None:
        raise DataError(
            f"{checkpoint.path} records no {_ROLE_NAMES[role]} file; give one with --data"
        )
    path = Path(record.path)
    if not path.exists():
        raise DataError(
            f"the {_ROLE_NAMES[role]} file recorded in {checkpoint.path}, {path}, is missing; "
            f"put it back there or give the file with --data{_relink_hint(checkpoint, role)}"
        )
    return path


def _relink_hint(checkpoint: Checkpoint, role: str) -> str:
    """Where the model has removed rows, the way on once they are deleted from its file."""
    if role != "train" or not bool(np.isin(checkpoint.roles, GONE).any()):
        return ""
    return (
        " (if you deleted the removed rows from it, `puma relink MODEL --data FILE -o OUT` "
        "points the model at the file as it is now)"
    )


def load_recorded_dataset(
    checkpoint: Checkpoint, role: str, phases: Phases | None = None
) -> Dataset:
    """Load the recorded file for `role`, refusing one whose sha256 has changed
    (`phases`: told of a folder's read)."""
    path = recorded_data_path(checkpoint, role)
    record = checkpoint.data[role]
    assert record is not None  # recorded_data_path raised otherwise

    def unchanged(digest: str) -> None:
        if digest != record.sha256:
            raise DataError(
                f"{path} has changed since {checkpoint.path} was made (sha256 "
                f"{record.sha256[:12]} recorded, {digest[:12]} now); restore the original "
                f"file or retrain the model{_relink_hint(checkpoint, role)}"
            )

    if path.is_dir():  # each image read once, hashed as it is decoded
        try:
            dataset = load_dataset(path, class_names=checkpoint.class_names, phases=phases)
        except DataError:
            unchanged(sha256_path(path))  # a change, where that is why it cannot be read
            raise
        assert dataset.sha256 is not None
        unchanged(dataset.sha256)
        return fit_to_model(checkpoint, dataset)
    digest = sha256_path(path)
    unchanged(digest)
    dataset = load_dataset(
        path, record.label_col, record.id_col, checkpoint.class_names, known_sha256=digest
    )
    return fit_to_model(checkpoint, dataset)


def load_recorded_or_none(
    checkpoint: Checkpoint, role: str, phases: Phases | None = None
) -> Dataset | None:
    """The recorded file for `role`, sha256-checked, or None when none was recorded."""
    if checkpoint.data.get(role) is None:
        return None
    return load_recorded_dataset(checkpoint, role, phases)


def load_compatible(checkpoint: Checkpoint, path: Path, phases: Phases | None = None) -> Dataset:
    """A file the user names for this model, labels mapped through its classes, shape checked."""
    loaded = load_dataset(path, class_names=checkpoint.class_names, phases=phases)
    return fit_to_model(checkpoint, loaded)


def load_sidecar(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a recorded sidecar file, refused when missing or changed."""
    record = checkpoint.sidecars[name]
    path = Path(record.path)
    if not path.exists():
        raise DataError(
            f"the {name} file recorded in {checkpoint.path}, {path}, is missing; put it back "
            "there (it is written beside the model at training)"
        )
    digest = sha256_file(path)
    if digest != record.sha256:
        raise DataError(
            f"{path} has changed since {checkpoint.path} was made (sha256 {record.sha256[:12]} "
            f"recorded, {digest[:12]} now); restore it or retrain the model"
        )
    try:  # mapped, not read whole beside the tensors (Amnesiac's: steps x parameters)
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from exc


def data_status(checkpoint: Checkpoint) -> dict[str, str]:
    """For each recorded file: 'ok', 'changed' or 'missing' (what `info` shows)."""
    status: dict[str, str] = {}
    for role, record in checkpoint.data.items():
        if record is None:
            continue
        path = Path(record.path)
        if not path.exists():
            status[role] = "missing"
        else:
            status[role] = "ok" if sha256_path(path) == record.sha256 else "changed"
    return status


def fit_to_model(checkpoint: Checkpoint, dataset: Dataset) -> Dataset:
    """`dataset` read as the model reads its training data: columns matched by name,
    classes by name (`io.columns`); refused when its shape or classes do not fit."""
    want, have = checkpoint.arch.input_shape, dataset.input_shape
    if have != want:
        if len(want) == 1:
            raise DataError(
                f"{dataset.name} has {_shape(have)} features but {checkpoint.path} was "
                f"trained on {_shape(want)}; use data with the model's columns "
                f"({', '.join(checkpoint.feature_names[:8])}"
                f"{', ...' if len(checkpoint.feature_names) > 8 else ''})"
            )
        kind = "images" if len(want) == 3 else "rows"
        fix = "resize or reshape them to that"
        if len(want) == len(have) == 3 and want[1:] == have[1:] and {want[0], have[0]} == {1, 3}:
            fix = f"convert them to {'RGB' if want[0] == 3 else 'grey-scale'}"
        raise DataError(
            f"{dataset.name} holds {kind} of {_shape(have)}, but {checkpoint.path} was "
            f"trained on {kind} of {_shape(want)}; {fix}"
        )
    owner = str(checkpoint.path or "the model")
    dataset = align_features(
        dataset, checkpoint.feature_names, checkpoint.feature_names_given, owner
    )
    dataset = align_classes(dataset, checkpoint.class_names, owner)
    if len(dataset) and int(dataset.y.max()) >= checkpoint.arch.n_classes:
        row = int(np.argmax(dataset.y >= checkpoint.arch.n_classes))
        raise DataError(
            f"{dataset.name}: id {dataset.ids[row]} has label {int(dataset.y[row])}, but "
            f"{checkpoint.path} knows classes 0..{checkpoint.arch.n_classes - 1} only"
        )
    return dataset


def _shape(shape: tuple[int, ...]) -> str:
    return str(shape[0]) if len(shape) == 1 else "x".join(map(str, shape))


_ROLE_NAMES = {"train": "training", "val": "validation", "test": "test"}


def criterion_set(
    checkpoint: Checkpoint,
    dataset: Dataset,
    roles: np.ndarray,
    criterion_data: Path | None,
    phases: Phases | None = None,
) -> Dataset:
    """Held-out data for C: --criterion-data, else the recorded validation file or rows."""
    if criterion_data is not None:
        return load_compatible(checkpoint, criterion_data, phases)
    if checkpoint.data.get("val") is not None:
        return load_recorded_dataset(checkpoint, "val", phases)
    rows = np.flatnonzero(roles == ROLE_VALIDATION)
    if rows.size == 0 and (roles == ROLE_WITHDRAWN).any():
        now = int(((roles == ROLE_WITHDRAWN) & (checkpoint.roles == ROLE_VALIDATION)).sum())
        total = int((roles == ROLE_WITHDRAWN).sum())
        who = {
            (True, False): "this marking withdraws",
            (False, True): "earlier removals withdrew",
        }.get((now > 0, total > now), "this marking and earlier removals withdraw")
        raise PumaError(
            f"{who} all {total} validation rows of {checkpoint.path} (marked rows leave the "
            "criterion C), so none is left for it; pass --criterion-data FILE (held-out rows, "
            "neither trained on nor marked)"
        )
    if rows.size == 0:
        imported = bool(checkpoint.provenance) and checkpoint.provenance[0].get("op") == "import"
        again = "import it again with --val FILE" if imported else "retrain with --val-frac 0.1"
        raise PumaError(
            f"{checkpoint.path} has no held-out validation data for the criterion C; "
            f"pass --criterion-data FILE (rows it was not trained on) or {again}"
        )
    return dataset.subset(rows)


def trained_on_warning(
    checkpoint: Checkpoint, dataset: Dataset, other: Dataset, use: str
) -> list[str]:
    """A warning where held-out data given as `use` holds rows the model is trained on."""
    rows = np.flatnonzero(checkpoint.roles == ROLE_TRAINED)
    return trained_rows_warning(dataset, rows, other, use)


def recorded_paths(checkpoint: Checkpoint) -> list[Path]:
    """Every file the checkpoint records: its data files and its sidecars."""
    records = [r for r in checkpoint.data.values() if r is not None]
    return [Path(r.path) for r in [*records, *checkpoint.sidecars.values()]]


def protect_recorded(outputs: list[Path | None], checkpoint: Checkpoint) -> None:
    """Refuse an output that would replace a file the checkpoint records, overwrite or not:
    a command reads those through the checkpoint, so they are its inputs too."""
    for output in outputs:
        if output is not None:
            check_not_input(output, recorded_paths(checkpoint))
