"""Marking: the paper's Listing 3, per-class clusters, random shares, and the bounds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from puma_cli.data.dataset import Dataset
from puma_cli.data.marking import all_classes_marking, check_marking, kmeans_marking, random_marking
from puma_cli.data.synthetic import make_synthetic
from puma_cli.errors import PumaError


@pytest.fixture(scope="module")
def radial() -> Dataset:
    return make_synthetic("radial", n=300, seed=1)


def test_kmeans_marking_matches_the_papers_listing(radial: Dataset) -> None:
    # Listing 3, written out: KMeans(8, random_state=0) on the class's features; the
    # cluster with the fewest members; its rows.
    label_index = np.where(radial.y == 1)[0]
    x = radial.X[label_index]
    kmeans = KMeans(n_clusters=8, random_state=0, n_init=10).fit(x.reshape(len(x), -1))
    values, counts = np.unique(kmeans.labels_, return_counts=True)
    expected = label_index[np.where(kmeans.labels_ == values[counts.argsort()[0]])]
    marked = kmeans_marking(radial, cls=1, clusters=8, seed=0)
    np.testing.assert_array_equal(marked, expected)
    assert (radial.y[marked] == 1).all()
    assert 0 < marked.size < (radial.y == 1).sum() / 4


def test_all_classes_marks_one_cluster_per_class(radial: Dataset) -> None:
    marked = all_classes_marking(radial, clusters=8, seed=0)
    assert set(radial.y[marked].tolist()) == {0, 1}
    np.testing.assert_array_equal(np.sort(marked), marked)


def test_random_marking_is_seeded_and_sized(radial: Dataset) -> None:
    a, b = random_marking(len(radial), 0.1, seed=4), random_marking(len(radial), 0.1, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.size == 30 and np.unique(a).size == 30
    assert not np.array_equal(a, random_marking(len(radial), 0.1, seed=5))


def test_empty_and_total_markings_are_refused(radial: Dataset) -> None:
    with pytest.raises(PumaError, match="selects no point"):
        check_marking(random_marking(len(radial), 0.001), len(radial), radial.name)
    with pytest.raises(PumaError, match="selects all 300 points"):
        check_marking(random_marking(len(radial), 1.0), len(radial), radial.name)


def test_absent_class_and_too_many_clusters_are_refused(radial: Dataset) -> None:
    with pytest.raises(PumaError, match="class 5 has no rows"):
        kmeans_marking(radial, cls=5)
    with pytest.raises(PumaError, match="more than the 150 rows"):
        kmeans_marking(radial, cls=0, clusters=151)
