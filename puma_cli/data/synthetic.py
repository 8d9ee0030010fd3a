"""The paper's synthetic sets (Figure 6) and two classic ones, seeded.

radial: 6 Gaussian clusters on a circle, classes alternating (2 classes).
rectangular: a 4x4 grid of clusters, class (row + column) mod 3 (3 classes).
moons: scikit-learn's two half-moons. spiral: three interleaved spiral arms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import make_moons

from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError

MAX_ROWS = 10_000_000  # 160 MB of float64 features for a 2-D set; past it, bring a file


@dataclass(frozen=True)
class SyntheticKind:
    n: int
    noise: float
    n_classes: int
    make: Callable[[int, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _radial(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cluster = np.arange(n) % 6
    angle = 2 * np.pi * cluster / 6
    centres = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centres + noise * rng.standard_normal((n, 2)), cluster % 2


def _rectangular(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cluster = np.arange(n) % 16
    row, col = cluster // 4, cluster % 4
    centres = np.stack([col, row], axis=1).astype(np.float64)
    return centres + noise * rng.standard_normal((n, 2)), (row + col) % 3


def _moons(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_moons(n_samples=n, noise=noise, random_state=int(rng.integers(2**31)))
    return X, y


def _spiral(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    arm = np.arange(n) % 3
    t = rng.uniform(0.0, 1.0, n)
    angle = 4.0 * t + arm * 2 * np.pi / 3 + noise * rng.standard_normal(n)
    return np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1), arm


KINDS: dict[str, SyntheticKind] = {
    "radial": SyntheticKind(600, 0.15, 2, _radial),
    "rectangular": SyntheticKind(800, 0.15, 3, _rectangular),
    "moons": SyntheticKind(600, 0.15, 2, _moons),
    "spiral": SyntheticKind(600, 0.2, 3, _spiral),
}


def make_synthetic(
    kind: str, n: int | None = None, noise: float | None = None, seed: int = 0
) -> Dataset:
    """Generate `kind` with n points (the paper's size by default); ids are 0..n-1."""
    if kind not in KINDS:
        raise PumaError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = KINDS[kind]
    n = spec.n if n is None else n
    noise = spec.noise if noise is None else noise
    if n < 2 * spec.n_classes:
        raise PumaError(f"--n {n} is too small for {kind}; it needs at least {2 * spec.n_classes}")
    if noise < 0:
        raise PumaError(f"--noise {noise} is negative; give 0 or more")
    rng = np.random.default_rng(seed)
    X, y = spec.make(n, noise, rng)
    order = rng.permutation(n)
    return Dataset(
        X=np.asarray(X, dtype=np.float64)[order],
        y=np.asarray(y, dtype=np.int64)[order],
        ids=np.array([str(i) for i in range(n)]),
        feature_names=("x0", "x1"),
    )


FLIP_STREAM = 0x666C6970  # "flip": keeps the flipped rows apart from seeded markings


def flip_labels(dataset: Dataset, frac: float, seed: int) -> tuple[Dataset, np.ndarray]:
    """Give `frac` of the rows another class at random: (noisy dataset, flipped row positions).

    The rows come from a stream of their own (FLIP_STREAM with the seed): drawn from
    `seed` alone they were the rows `mark --random` picks at the same seed and share, so
    a random removal from such a file removed exactly the mislabelled points."""
    if not 0 < frac < 1:
        raise PumaError(f"--flip-labels {frac} is out of range; give a fraction between 0 and 1")
    rng = np.random.default_rng([FLIP_STREAM, seed])
    count = round(frac * len(dataset))
    if count == 0:
        raise PumaError(f"--flip-labels {frac} flips no point of {len(dataset)}; raise it")
    rows = np.sort(rng.choice(len(dataset), size=count, replace=False))
    y = dataset.y.copy()
    k = dataset.n_classes
    y[rows] = (y[rows] + rng.integers(1, k, size=count)) % k
    return Dataset(X=dataset.X, y=y, ids=dataset.ids, feature_names=dataset.feature_names), rows
