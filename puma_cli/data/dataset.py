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
