"""Calibration benchmark: `puma calibrate` against temperature scaling.

For every sample dataset and seed: train the default recipe (10 % validation split),
then (a) `puma calibrate` and (b) temperature scaling, a single T > 0 fitted by LBFGS on
the validation split's negative log-likelihood (Guo et al. 2017): both see the same
held-out data. Reported: binned ECE (15 bins) and accuracy on the validation split
(what both methods were fitted on) and on the test split (what neither saw).

    python benchmarks/calibration.py [--seeds 2] [--datasets radial ...]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import DATA, arguments, grouped, invocation, means, run_cases, table, write_results

from puma_cli.errors import PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.jobs import train as train_job
from puma_cli.jobs.calibrate import calibrate
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.quality.calibration import expected_calibration_error

DATASETS = {
    "radial": (".csv", "mlp"),
    "rectangular": (".csv", "mlp"),
    "breast-cancer": (".csv", "mlp"),
    "breast-cancer-diagnostic": (".csv", "mlp"),
    "german-credit": (".csv", "mlp"),
    "digits": (".npz", "cnn"),
}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits.double() / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp())


def figures(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    probs = torch.softmax(logits.double(), 1).numpy()
    return expected_calibration_error(probs, labels), float((probs.argmax(1) == labels).mean())


def run_case(name: str, seed: int, work: Path) -> list[dict[str, Any]]:
    suffix, arch = DATASETS[name]
    model = work / "m.safetensors"
    train_job.train(
        DATA / f"{name}-train{suffix}",
        model,
        TrainRecipe(arch=arch, seed=seed),
        test=DATA / f"{name}-test{suffix}",
        overwrite=True,
    )
    checkpoint = ckpt.load_checkpoint(model)
    train = recorded.load_recorded_dataset(checkpoint, "train")
    val = train.subset(np.flatnonzero(checkpoint.roles == ckpt.ROLE_VALIDATION))
    test = recorded.load_recorded_dataset(checkpoint, "test")
    logits = {
        "val": predict_logits(checkpoint.model, val.X),
        "test": predict_logits(checkpoint.model, test.X),
    }
    rows = []

    def row(
        method: str,
        val_fig: tuple[float, float],
        test_fig: tuple[float, float],
        seconds: float,
        note: str = "",
    ) -> None:
        rows.append(
            {
                "dataset": name,
                "seed": seed,
                "method": method,
                "val_ece": val_fig[0],
                "val_accuracy": val_fig[1],
                "test_ece": test_fig[0],
                "test_accuracy": test_fig[1],
                "seconds": seconds,
                "note": note,
            }
        )

    row("original", figures(logits["val"], val.y), figures(logits["test"], test.y), 0.0)
    started = time.perf_counter()
    temperature = fit_temperature(logits["val"], torch.as_tensor(val.y))
    seconds = time.perf_counter() - started
    row(
        "temperature scaling",
        figures(logits["val"] / temperature, val.y),
        figures(logits["test"] / temperature, test.y),
        seconds,
        f"T = {temperature:.3f}",
    )
    started = time.perf_counter()
    try:
        report = calibrate(model, work / "c.safetensors", overwrite=True)
        patched = ckpt.load_checkpoint(work / "c.safetensors").model
        row(
            "puma calibrate",
            figures(predict_logits(patched, val.X), val.y),
            figures(predict_logits(patched, test.X), test.y),
            report.seconds,
            f"eta scale {report.eta_scale:g}",
        )
    except PumaError as exc:  # refused: the model is left as it was
        row(
            "puma calibrate",
            figures(logits["val"], val.y),
            figures(logits["test"], test.y),
            time.perf_counter() - started,
            f"refused: {str(exc)[:60]}",
        )
    return rows


def main() -> None:
    args = arguments(__doc__, "calibration.md", DATASETS, seeds=2)
    started = time.perf_counter()
    cases = [(name, seed) for name in args.datasets for seed in range(args.seeds)]
    rows = run_cases(cases, run_case)
    lines = []
    for (dataset, method), g in grouped(rows, "dataset", "method").items():
        m = means(g, "val_ece", "val_accuracy", "test_ece", "test_accuracy", "seconds")
        lines.append(
            (
                dataset,
                method,
                f"{m['val_ece']:.4f}",
                f"{100 * m['val_accuracy']:.2f}",
                f"{m['test_ece']:.4f}",
                f"{100 * m['test_accuracy']:.2f}",
                f"{m['seconds']:.2f}",
                "; ".join(r["note"] for r in g if r["note"]),
            )
        )
    header = ("dataset", "method", "val ECE", "val acc", "test ECE", "test acc", "seconds", "notes")
    text = (
        f"# Calibration benchmark\n\n{invocation(__file__)} — "
        f"{args.seeds} seed(s), {time.perf_counter() - started:.0f} s, torch {torch.__version__}.\n\n"
        "Means over seeds. Both methods are fitted on the validation split (10 % of the training "
        "file, never trained on); the test split is seen by neither. A refused `puma calibrate` "
        "writes nothing, so its row repeats the original's figures.\n\n"
        + table(header, lines)
        + "\n"
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
