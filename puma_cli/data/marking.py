"""Which training points to remove: the paper's k-means cluster marking, or a random share.

The paper marks a cluster rather than scattered points because a model generalises to
isolated points it never saw, so their removal cannot be seen (Appendix A, Listing 3).
"""

from __future__ import annotations

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError

MAX_CLUSTERS = 10_000  # k-means past this many clusters marks single points: use --random


def class_number(dataset: Dataset, value: str | int) -> int:
    """The class `value` names: one of the data's class names, or a class number."""
    names = dataset.class_names
    if names is not None and str(value) in names:
        return names.index(str(value))
    try:
        return int(value)
    except ValueError:
        classes = ", ".join(names) if names is not None else f"0..{dataset.n_classes - 1}"
        raise PumaError(
            f"--class {value}: {dataset.name} has no such class (its classes: {classes})"
        ) from None


def kmeans_marking(dataset: Dataset, cls: int, clusters: int = 8, seed: int = 0) -> np.ndarray:
    """Rows of the smallest of `clusters` k-means clusters among class `cls` (Listing 3).

    As the listing: KMeans(n_clusters, random_state=seed) on the flattened features of
    the class's rows; the cluster with the fewest members (the first such on a tie).
    n_init=10 is pinned because scikit-learn's default changed after the paper.
    """
    rows = np.flatnonzero(dataset.y == cls)
    if rows.size == 0:
        present = ", ".join(str(int(c)) for c in np.unique(dataset.y))
        raise PumaError(f"class {cls} has no rows in {dataset.name} (classes present: {present})")
    if clusters < 1:
        raise PumaError(f"--clusters {clusters}: give 1 or more")
    if clusters > rows.size:
        raise PumaError(
            f"--clusters {clusters} is more than the {rows.size} rows of class {cls}; lower it"
        )
    from sklearn.cluster import KMeans  # 1-1.7 s to import: only where k-means runs

    features = dataset.X[rows].reshape(rows.size, -1)
    labels = KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit(features).labels_
    values, counts = np.unique(labels, return_counts=True)
    smallest = values[np.argsort(counts, kind="stable")[0]]
    return rows[labels == smallest]


def all_classes_marking(dataset: Dataset, clusters: int = 8, seed: int = 0) -> np.ndarray:
    """One smallest k-means cluster per class, as the paper's experiments run Listing 3."""
    marked = [kmeans_marking(dataset, int(c), clusters, seed) for c in np.unique(dataset.y)]
    return np.sort(np.concatenate(marked))


def random_marking(n: int, frac: float, seed: int = 0) -> np.ndarray:
    """A uniformly random `frac` of `n` rows (their positions, sorted)."""
    if not 0 < frac <= 1:
        raise PumaError(f"--random {frac} is out of range; give a fraction in (0, 1)")
    count = round(frac * n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False))


def check_marking(rows: np.ndarray, n: int, name: str) -> None:
    """A marking of `n` rows of the data `name` must leave something to remove and
    something to keep."""
    if rows.size == 0:
        raise PumaError(
            f"the marking selects no point of {name}; raise --random or use cluster marking"
        )
    if np.unique(rows).size >= n:
        raise PumaError(
            f"the marking selects all {n} points of {name}; nothing would remain to learn "
            "from: mark fewer points"
        )
