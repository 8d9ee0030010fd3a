"""`puma make-data`: a synthetic set to CSV or NPZ, with a test file and flipped labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puma_cli.data.dataset import split_rows
from puma_cli.data.synthetic import MAX_ROWS, flip_labels, make_synthetic
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.io.atomic import check_writable, write_atomically
from puma_cli.io.datasets import save_dataset
from puma_cli.io.ids import write_ids as write_ids_file


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
    require_range("--flip-labels", flip_frac, 0, 1, high_open=True)
    if n is not None:
        require_range("--n", n, 1, MAX_ROWS)
    if noise is not None:
        require_range("--noise", noise, 0)
    require_range("--seed", seed, 0, SEED_MAX)
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
