"""A label or id column's cells, from a CSV or an NPZ: labels as whole numbers 0..K-1 or
as class names (mapped to 0..K-1 in sorted order, or through the names a checkpoint
recorded), ids unique."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from puma_cli.errors import DataError


def parse_labels(
    path: Path, cells: list[str], lines: list[int], class_names: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    numbers = [_as_number(cell) for cell in cells]
    if all(n is None for n in numbers):
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(cells)))
        index = {name: i for i, name in enumerate(names)}
        for cell, line in zip(cells, lines, strict=True):
            if cell not in index:
                raise DataError(
                    f"{path} line {line}: label {cell!r} is not one of the model's classes "
                    f"({', '.join(names)})"
                )
        return np.array([index[c] for c in cells], dtype=np.int64), names
    y = np.empty(len(cells), dtype=np.int64)
    for i, (cell, number, line) in enumerate(zip(cells, numbers, lines, strict=True)):
        if number is None:
            if not cell:
                raise DataError(f"{path} line {line}: the label is empty; fill or drop that row")
            raise DataError(
                f"{path} line {line}: label {cell!r} is not a number, but other labels are; "
                "use class names throughout or whole numbers 0..K-1 throughout"
            )
        if not math.isfinite(number) or number != int(number) or number < 0:
            raise DataError(
                f"{path} line {line}: label {cell!r} is not a class; labels are whole numbers "
                "0..K-1 (or class names)"
            )
        y[i] = int(number)
    return y, None


def _as_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def parse_ids(path: Path, cells: list[str], lines: list[int]) -> np.ndarray:
    first: dict[str, int] = {}
    for cell, line in zip(cells, lines, strict=True):
        if not cell:
            raise DataError(f"{path} line {line}: the id is empty; every row needs an id")
        if cell in first:
            raise DataError(
                f"{path} line {line}: id {cell!r} repeats line {first[cell]}; ids must be unique"
            )
        first[cell] = line
    return np.array(cells)
