"""The in-memory dataset every layer passes around, the stratified split, and the digest
of some rows that stands for them once a file is rewritten."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

MAX_ROW_AXES = 5
"""The axes one row may have: (d,), (C, H, W), (T, F) sequences, (C, D, H, W) volumes."""


@dataclass(frozen=True)
class Dataset:
    """X: (n, d), (n, C, H, W) or (n, ...) with up to MAX_ROW_AXES axes a row, real
    numbers in the file's own type; y: (n,) int64 in 0..K-1; ids: (n,) str.

    named_features: the file named its columns (a CSV header, an NPZ's feature_names),
    so they can be matched by name; False where the names were made up (x0, x1, ...)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...] | None = None
    path: Path | None = None
    sha256: str | None = None
    named_features: bool = True

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_classes(self) -> int:
        """Classes the labels imply: the names, or the largest label plus one."""
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.y.max()) + 1 if len(self) else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.X.shape[1:])

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the dataset"

    def subset(self, rows: np.ndarray) -> Dataset:
        """The rows at the given positions, keeping names and source."""
        return replace(self, X=self.X[rows], y=self.y[rows], ids=self.ids[rows])


def split_rows(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: (kept rows, held-out rows), about `frac` of each class held out.

    Every class keeps at least one row; both arrays are sorted row positions.
    """
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        take = min(round(frac * rows.size), rows.size - 1)
        held.append(rng.permutation(rows)[:take])
    held_out = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(y.shape[0]), held_out)
    return kept, held_out


DIGEST_CHUNK = 4096  # rows hashed at a time: a memory-mapped file is read a slice at a time


def rows_digest(dataset: Dataset, rows: np.ndarray) -> str:
    """sha256 of the given rows' values and labels, in order: what a file must hold, row
    for row, to stand for them (`puma relink`). The ids are left out, since a file without
    an id column numbers its rows, and deleting rows renumbers the rest; the values are
    taken in the file's own type, as read (a CSV's as float64)."""
    digest = hashlib.sha256()
    digest.update(f"{dataset.X.dtype.str} {dataset.input_shape} {rows.size}\n".encode())
    for start in range(0, rows.size, DIGEST_CHUNK):
        chunk = rows[start : start + DIGEST_CHUNK]
        digest.update(np.ascontiguousarray(dataset.X[chunk]).tobytes())
        digest.update(np.ascontiguousarray(dataset.y[chunk], dtype="<i8").tobytes())
    return digest.hexdigest()


def shared_rows(train: Dataset, rows: np.ndarray, other: Dataset) -> int:
    """How many rows of `other` hold the values and the label of one of `train`'s `rows`
    (the values compared in `train`'s type): held-out data that is in fact trained on."""
    if other.input_shape != train.input_shape or rows.size == 0:
        return 0
    keys: set[tuple[bytes, int]] = set()
    for start in range(0, rows.size, DIGEST_CHUNK):
        chunk = rows[start : start + DIGEST_CHUNK]
        keys.update(_row_keys(np.asarray(train.X[chunk]), train.y[chunk], train.X.dtype))
    found = 0
    for start in range(0, len(other), DIGEST_CHUNK):
        part = slice(start, start + DIGEST_CHUNK)
        found += sum(key in keys for key in _row_keys(
            np.asarray(other.X[part]), other.y[part], train.X.dtype))  # fmt: skip
    return found


def _row_keys(X: np.ndarray, y: np.ndarray, dtype: np.dtype) -> list[tuple[bytes, int]]:
    """A 16-byte digest of each row's values, with its label: a set of them for 50,000
    CIFAR-size rows holds a few MB, where the rows themselves are 150 MB."""
    flat = np.ascontiguousarray(X.reshape(len(X), -1), dtype=dtype)
    return [
        (hashlib.blake2b(row.tobytes(), digest_size=16).digest(), int(label))
        for row, label in zip(flat, y, strict=True)
    ]


# What held-out rows that are in fact trained on do to each use of them.
HELD_OUT_USES = {
    "--val": "the model's validation figures, and the criterion removals keep, are then "
    "in part a fit to training rows",
    "--test": "the model's test figures are then in part training figures",
    "--criterion-data": "the criterion C is held-out data, and on training rows a patch "
    "keeps the model's fit to them",
    "--nonmembers": "non-members the model was trained on look like members, and the "
    "attack's figures understate what it tells apart",
}


def trained_rows_warning(train: Dataset, rows: np.ndarray, other: Dataset, use: str) -> list[str]:
    """A warning where held-out data given as `use` (HELD_OUT_USES) holds rows the model
    is trained on (`train`'s `rows`): the same file given twice, or a split that leaks."""
    shared = shared_rows(train, rows, other)
    if not shared:
        return []
    return [
        f"{shared} of the {len(other)} rows of {other.name} ({use}) repeat a row the model "
        "is trained on, values and label (the same file twice, a split that leaks, or "
        f"duplicate records): {HELD_OUT_USES[use]}"
    ]
