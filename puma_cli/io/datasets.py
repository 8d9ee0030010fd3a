"""Datasets and ids files: CSV/NPZ/IDX in, `Dataset` out, and back.

CSV: a header; one label column (`label` unless told), an optional id column, every
other column a numeric feature. NPZ: arrays `X` (n, d), (n, C, H, W) or any (n, ...) of up
to five axes a row (sequences (n, T, F), volumes), `y` (n,),
optional `ids` (n,), `feature_names`, `class_names`; never pickled objects. IDX:
MNIST's format, the images file with its labels file beside it.

Labels are whole numbers 0..K-1, or names: a label column with no numbers at all is
read as class names and mapped to 0..K-1 in sorted order (or through the names a
checkpoint recorded), and the names travel with the model.

`load_dataset` takes the reader by the file's first bytes: `csv_table.py`, `npz.py`,
`idx.py`, or for a folder `image_folder.py`; a label or id column's cells are read in
`cells.py`, the same for a CSV and an NPZ.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError
from puma_cli.io.atomic import sha256_file
from puma_cli.io.csv_table import read_csv
from puma_cli.io.files import require_file
from puma_cli.io.idx import is_idx, read_idx_pair
from puma_cli.io.npz import read_npz_dataset

if TYPE_CHECKING:
    from puma_cli.models.predict import Phases


def load_dataset(
    path: Path,
    label_col: str = "label",
    id_col: str = "id",
    class_names: Sequence[str] | None = None,
    known_sha256: str | None = None,
    phases: Phases | None = None,
) -> Dataset:
    """Read a CSV, NPZ or IDX file, or a folder of images (`root/<class>/*.png`);
    `class_names` maps named labels as a model recorded them. `known_sha256`: the file's
    sha256 where the caller has just taken it (a recorded file's check), so that the file
    is not hashed twice (a folder's images are hashed as they are read). `phases` is told
    of a folder's read, image by image (a file's read is not told)."""
    path = Path(path)
    if path.is_dir():
        from puma_cli.io.image_folder import read_image_folder

        return read_image_folder(path, class_names, phases)  # hashed as it is read
    require_file(path, "file", "a CSV, NPZ or IDX file, or a folder of images")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if _is_safetensors(head, path.stat().st_size):
        raise DataError(
            f"{path} is a safetensors file (a model or a network's weights), not data: give "
            "a CSV, NPZ or IDX file, or a folder of images"
        )
    if head[:2] == b"PK":
        dataset = read_npz_dataset(path, class_names)
    elif is_idx(head) or path.suffix == ".gz":
        dataset = read_idx_pair(path)
    else:
        raw = path.read_bytes()
        if not raw.strip():
            raise DataError(f"{path} is empty; expected a header line and one row per point")
        dataset = read_csv(path, raw, label_col, id_col, class_names)
    _check_finite(dataset, path)
    return replace(dataset, path=path, sha256=known_sha256 or sha256_file(path))


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with its JSON header's length (8 bytes, little-endian)
    and then the header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _check_finite(dataset: Dataset, path: Path) -> None:
    if not np.issubdtype(dataset.X.dtype, np.floating):
        return  # whole numbers are always finite
    flat = dataset.X.reshape(len(dataset), -1)
    chunk = max(1, (1 << 24) // max(flat.shape[1], 1))  # some 16 M values at a time
    for start in range(0, len(dataset), chunk):
        bad = ~np.isfinite(flat[start : start + chunk])
        if not bad.any():
            continue
        row, col = (int(v) for v in np.argwhere(bad)[0])
        row += start
        value = flat[row, col]
        if dataset.X.ndim > 2:  # images, sequences: a position in the row, not a column
            at = ", ".join(str(int(i)) for i in np.unravel_index(col, dataset.X.shape[1:]))
            what = f"the value at [{at}]"
        elif col < len(dataset.feature_names):
            what = f"column '{dataset.feature_names[col]}'"
        else:
            what = f"feature {col}"
        raise DataError(
            f"{path}: id {dataset.ids[row]}, {what} is {value}; "
            f"{int(bad.any(axis=1).sum())} row(s) hold NaN or inf: fill or drop them"
        )


# --- writing -----------------------------------------------------------------------------


def save_dataset(path: Path, dataset: Dataset) -> None:
    """Write CSV (`id`, features, `label`) or, for a .npz path, NPZ. Floats round-trip exactly."""
    if Path(path).suffix == ".npz":
        with open(path, "wb") as handle:
            arrays: dict[str, np.ndarray] = {
                "X": dataset.X,
                "y": dataset.y,
                "ids": dataset.ids.astype(str),
                "feature_names": np.array(dataset.feature_names, dtype=str),
            }
            if dataset.class_names is not None:
                arrays["class_names"] = np.array(dataset.class_names, dtype=str)
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
        return
    if dataset.X.ndim != 2:
        raise DataError(
            f"{path}: data of shape {dataset.X.shape} (not a table) can only be saved as .npz"
        )
    labels = (
        [dataset.class_names[i] for i in dataset.y]
        if dataset.class_names is not None
        else [str(int(v)) for v in dataset.y]
    )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", *dataset.feature_names, "label"])
        for ident, row, label in zip(dataset.ids, dataset.X.tolist(), labels, strict=True):
            writer.writerow([ident, *(repr(v) for v in row), label])


@dataclass(frozen=True)
class DataOptions:
    label_col: str = "label"
    id_col: str = "id"
