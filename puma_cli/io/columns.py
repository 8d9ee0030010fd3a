"""Reading a file the way a model was trained: features matched by name, classes by name.

A test, criterion or non-member file whose columns are swapped or renamed must not be
read by position (it would score 0.55 where the model scores 1.0), and labels named
where the model numbered its classes (or the other way) must not be renumbered. Where
both sides name their feature columns (a CSV header, an NPZ `feature_names`), they are
matched by name, reordered if need be, and refused if they differ; where either side
has no names (images, an NPZ without `feature_names`), by position and shape only.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError


def align_features(dataset: Dataset, names: tuple[str, ...], named: bool, owner: str) -> Dataset:
    """`dataset` with its columns in the order of `names` (the features `owner` was trained
    on); refused when both sides name their columns and the names differ."""
    if not (named and dataset.named_features) or dataset.X.ndim != 2:
        return dataset
    if dataset.feature_names == names:
        return dataset
    have = set(dataset.feature_names)
    missing = [n for n in names if n not in have]
    unknown = [n for n in dataset.feature_names if n not in set(names)]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"lacks {_some(missing)}")
        if unknown:
            parts.append(f"has unknown {_some(unknown)}")
        raise DataError(
            f"{dataset.name}: its columns are not the features {owner} was trained on "
            f"({'; '.join(parts)}); name the columns {_some(list(names))}"
        )
    order = [dataset.feature_names.index(n) for n in names]
    return replace(dataset, X=dataset.X[:, order], feature_names=names)


def align_classes(dataset: Dataset, names: tuple[str, ...] | None, owner: str) -> Dataset:
    """`dataset` with labels numbered as `owner` numbers its classes: named labels mapped
    through its names; refused where one side names classes and the other numbers them."""
    if names is None and dataset.class_names is None:
        return dataset
    if names is None:
        raise DataError(
            f"{dataset.name}: its labels are class names ({_some(list(dataset.class_names or ()))}"
            f"), but {owner} was trained on numbered classes 0..K-1; write the labels as those "
            "numbers"
        )
    if dataset.class_names is None:
        raise DataError(
            f"{dataset.name}: its labels are numbers, but {owner} was trained on named "
            f"classes ({_some(list(names))}); write the labels as those names"
        )
    if dataset.class_names == names:
        return dataset
    index = {name: i for i, name in enumerate(names)}
    used = {dataset.class_names[int(k)] for k in np.unique(dataset.y)}
    unknown = sorted(used - set(index))
    if unknown:
        raise DataError(
            f"{dataset.name}: label {unknown[0]!r} is not one of the classes {owner} knows "
            f"({_some(list(names))})"
        )
    mapping = np.array([index.get(name, -1) for name in dataset.class_names], dtype=np.int64)
    return replace(dataset, y=mapping[dataset.y], class_names=names)


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")
