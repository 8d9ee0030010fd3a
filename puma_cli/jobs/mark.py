"""`puma mark`: ids of training points to remove, by k-means cluster or at random."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puma_cli.data.marking import (
    MAX_CLUSTERS,
    all_classes_marking,
    check_marking,
    class_number,
    kmeans_marking,
    random_marking,
)
from puma_cli.errors import PumaError, require_range
from puma_cli.io.atomic import check_outputs, write_atomically
from puma_cli.io.datasets import DataOptions, load_dataset
from puma_cli.io.ids import write_ids as write_ids_file
from puma_cli.io.image_folder import index_image_folder
from puma_cli.models.predict import Phases


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
    cls: str | int | None = None,
    clusters: int = 8,
    all_classes: bool = False,
    random_frac: float | None = None,
    seed: int = 0,
    options: DataOptions = DataOptions(),
    overwrite: bool = False,
    phases: Phases | None = None,
) -> MarkReport:
    """Mark by k-means cluster (one class, or every class) or at random; write the ids."""
    chosen = [cls is not None, all_classes, random_frac is not None]
    if sum(chosen) != 1:
        raise PumaError(
            "choose exactly one marking: --class Y (a number or a class name), --all-classes"
            " or --random FRAC"
        )
    require_range("--clusters", clusters, 1, MAX_CLUSTERS)
    check_outputs([output], [data], overwrite)
    sha256: str | None
    if random_frac is not None and Path(data).is_dir():  # the ids alone: nothing decoded
        every, sha256 = index_image_folder(data, phases)
        all_ids, name = np.array(every), str(data)
    else:
        dataset = load_dataset(data, options.label_col, options.id_col, phases=phases)
        all_ids, sha256, name = dataset.ids, dataset.sha256, dataset.name
    if random_frac is not None:
        rows, method = random_marking(len(all_ids), random_frac, seed), f"random {random_frac}"
    elif all_classes:
        rows = all_classes_marking(dataset, clusters, seed)
        method = f"kmeans all classes, {clusters} clusters"
    else:
        assert cls is not None
        number = class_number(dataset, cls)
        rows = kmeans_marking(dataset, number, clusters, seed)
        named = f"{cls} ({number})" if str(cls) != str(number) else str(number)
        method = f"kmeans class {named}, {clusters} clusters"
    check_marking(rows, len(all_ids), name)
    ids = all_ids[np.sort(rows)].tolist()
    note = (
        f"puma mark: {method}, seed {seed}, {len(ids)} of {len(all_ids)} rows\n"
        f"data: {data.name} sha256 {sha256}"
    )
    write_atomically({output: lambda tmp: write_ids_file(tmp, ids, note)}, overwrite)
    return MarkReport(ids_file=output, count=len(ids), n=len(all_ids), method=method)
