"""Label-debugging benchmark: puma / ntk / self-influence against cleanlab.

On every sample dataset, 10 % of the training labels are flipped (seeded); a model is
trained on the noisy file with the default recipe; then each method ranks the rows the
model was trained on. cleanlab gets out-of-fold probabilities from 5-fold cross-validation
with the same recipe (what `find_label_issues` needs) and ranks by its label quality
score. Reported: share of flipped labels found after reviewing 10 % and 20 % of the data,
and wall time as a ratio to cleanlab's in the same run.

    pip install cleanlab   # benchmark-only
    python benchmarks/debugging.py [--seeds 2] [--datasets radial ...]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import DATA, arguments, grouped, invocation, means, run_cases, table, write_results

from puma_cli.data.synthetic import flip_labels
from puma_cli.io import checkpoint as ckpt
from puma_cli.io.datasets import load_dataset, save_dataset
from puma_cli.io.ids import write_ids
from puma_cli.jobs import train as train_job
from puma_cli.jobs.debug_labels import FRACTIONS, debug_labels
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.training import train_classifier
from puma_cli.quality.label_ranking import found_curve

DATASETS = {
    "radial": (".csv", "mlp"),
    "rectangular": (".csv", "mlp"),
    "breast-cancer": (".csv", "mlp"),
    "breast-cancer-diagnostic": (".csv", "mlp"),
    "german-credit": (".csv", "mlp"),
    "digits": (".npz", "cnn"),
}


def cleanlab_ranking(
    train, recipe: TrainRecipe, n_classes: int, seed: int
) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    from cleanlab.rank import get_label_quality_scores

    started = time.perf_counter()
    probs = np.zeros((len(train), n_classes))
    folds = np.random.default_rng(seed).permutation(len(train)) % 5
    for fold in range(5):
        held = np.flatnonzero(folds == fold)
        model = train_classifier(train.subset(np.flatnonzero(folds != fold)), recipe, n_classes)
        probs[held] = torch.softmax(predict_logits(model, train.X[held]).double(), 1).numpy()
    scores = get_label_quality_scores(train.y, probs)
    return np.argsort(scores, kind="stable"), time.perf_counter() - started


def run_case(name: str, seed: int, work: Path) -> list[dict[str, Any]]:
    suffix, arch = DATASETS[name]
    clean = load_dataset(DATA / f"{name}-train{suffix}")
    noisy, flipped_rows = flip_labels(clean, 0.1, seed)
    data_path, truth_path = work / f"noisy{suffix}", work / "flipped.txt"
    save_dataset(data_path, noisy)
    write_ids(truth_path, noisy.ids[flipped_rows].tolist())
    model = work / "m.safetensors"
    recipe = TrainRecipe(arch=arch, seed=seed)
    trained = train_job.train(data_path, model, recipe, overwrite=True)
    checkpoint = ckpt.load_checkpoint(model)
    rows = np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED)
    truth = np.isin(rows, flipped_rows)
    results = []
    for score in ("puma", "ntk", "self-influence"):
        for cache in (model.with_name("m.influence.safetensors"),):
            cache.unlink(missing_ok=True)
        report = debug_labels(model, k=0, score=score, truth=truth_path, overwrite=True)
        results.append(
            {
                "method": score,
                "found_10": report.truth["found_at_10pct"],
                "found_20": report.truth["found_at_20pct"],
                "seconds": report.seconds,
            }
        )
    order, seconds = cleanlab_ranking(
        load_dataset(data_path).subset(rows), recipe, checkpoint.arch.n_classes, seed
    )
    curve = found_curve(order, truth, FRACTIONS)
    results.append(
        {
            "method": "cleanlab (5-fold)",
            "found_10": float(curve[9]),
            "found_20": float(curve[19]),
            "seconds": seconds,
        }
    )
    for row in results:
        row.update(
            dataset=name,
            seed=seed,
            train_seconds=trained.seconds,
            ratio=row["seconds"] / seconds,
            ratio_with_training=(row["seconds"] + trained.seconds) / seconds,
        )
    return results


def main() -> None:
    args = arguments(__doc__, "debugging.md", DATASETS, seeds=2)
    started = time.perf_counter()
    cases = [(name, seed) for name in args.datasets for seed in range(args.seeds)]
    rows = run_cases(cases, run_case)
    lines = []
    for (dataset, method), g in grouped(rows, "dataset", "method").items():
        m = means(g, "found_10", "found_20", "seconds", "ratio", "ratio_with_training")
        lines.append(
            (
                dataset,
                method,
                f"{100 * m['found_10']:.1f} %",
                f"{100 * m['found_20']:.1f} %",
                f"{m['seconds']:.2f}",
                f"{m['ratio']:.3f}",
                f"{m['ratio_with_training']:.3f}",
            )
        )
    header = (
        "dataset",
        "method",
        "found at 10 % reviewed",
        "found at 20 % reviewed",
        "seconds",
        "time / cleanlab",
        "(with one training) / cleanlab",
    )
    text = (
        f"# Label-debugging benchmark\n\n{invocation(__file__)} — "
        f"{args.seeds} seed(s), {time.perf_counter() - started:.0f} s, torch {torch.__version__}.\n\n"
        "10 % of each training file's labels flipped; means over seeds. With 10 % flipped, a "
        "perfect ranking finds 100 % at 10 % reviewed; a random one 10 %. puma/ntk/self-influence "
        "times are for scoring an existing model (one inverse-HVP for puma); the last column adds "
        "the one training they need. cleanlab's time includes its 5 cross-validation trainings.\n\n"
        + table(header, lines)
        + "\n"
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
