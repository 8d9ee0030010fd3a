"""Removal benchmark: original / retrain / puma / influence on every sample dataset.

For each dataset, marking (k-means one cluster per class, random 5 %, random 20 %) and
seed: train the original, then remove the marked points with each method and compare
with retraining from scratch on what remains (the reference). Reported: test accuracy,
marked accuracy and loss, KL(retrain || method) on test and marked points, the KL
between two retrains with different seeds (the noise floor), and wall time as a ratio
to retraining's, measured in the same run (cold: no cache; cached: a second request).

    python benchmarks/removal.py                       # everything, ~15 min on 2 cores
    python benchmarks/removal.py --datasets radial --seeds 1 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import DATA, arguments, invocation, run_cases, write_results

from puma_cli.data.dataset import Dataset
from puma_cli.data.marking import all_classes_marking, random_marking
from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import rows_for_ids, write_ids
from puma_cli.jobs import remove as remove_job
from puma_cli.jobs import train as train_job
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.training import train_classifier
from puma_cli.quality.evaluation import evaluate
from puma_cli.unlearn import RemovalOptions

DATASETS = {
    "radial": ("radial", ".csv", "mlp"),
    "rectangular": ("rectangular", ".csv", "mlp"),
    "breast-cancer": ("breast-cancer", ".csv", "mlp"),
    "breast-cancer-diagnostic": ("breast-cancer-diagnostic", ".csv", "mlp"),
    "german-credit": ("german-credit", ".csv", "mlp"),
    "digits": ("digits", ".npz", "cnn"),
}
MARKINGS = ("kmeans", "random5", "random20")


def kl(p_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over points of KL(p_ref || softmax(logits))."""
    log_q = torch.log_softmax(logits.double(), dim=1)
    log_p = torch.log(p_ref.clamp_min(1e-300))
    return float((p_ref * (log_p - log_q)).sum(dim=1).mean())


def marked_ids(train: Dataset, marking: str, seed: int) -> list[str]:
    if marking == "kmeans":
        rows = all_classes_marking(train, clusters=8, seed=seed)
    else:
        rows = random_marking(train, {"random5": 0.05, "random20": 0.2}[marking], seed)
    return train.ids[rows].tolist()


def run_case(
    name: str, marking: str, seed: int, work: Path, scales: list[float]
) -> list[dict[str, Any]]:
    stem, suffix, arch = DATASETS[name]
    train_path, test_path = DATA / f"{stem}-train{suffix}", DATA / f"{stem}-test{suffix}"
    model = work / f"{name}-{marking}-{seed}.safetensors"
    recipe = TrainRecipe(arch=arch, seed=seed)
    original_train = train_job.train(train_path, model, recipe, test=test_path, overwrite=True)
    checkpoint = load_checkpoint(model)
    train = load_dataset(train_path)
    test = load_dataset(test_path)
    ids = marked_ids(train.subset(np.flatnonzero(checkpoint.roles == 0)), marking, seed)
    ids_file = work / "marked.txt"
    write_ids(ids_file, ids)
    marked = train.subset(rows_for_ids(train, ids, ids_file))

    def figures(
        label: str, net: torch.nn.Module, seconds: float | None, extra: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "dataset": name,
            "marking": marking,
            "seed": seed,
            "method": label,
            "test_accuracy": evaluate(net, test).accuracy,
            "marked_accuracy": evaluate(net, marked).accuracy,
            "marked_loss": evaluate(net, marked).loss,
            "test_loss": evaluate(net, test).loss,
            "seconds": seconds,
            "n_marked": len(ids),
            **extra,
        }

    rows = [figures("original", checkpoint.model, None, {"train_seconds": original_train.seconds})]
    out = work / "out.safetensors"
    ref = remove_job.remove(model, ids_file, out, method="retrain", overwrite=True)
    retrained = load_checkpoint(out).model
    rows.append(figures("retrain", retrained, ref.seconds, {}))
    # The noise floor: the same retraining with another seed.
    remaining = train.subset(np.flatnonzero(load_checkpoint(out).roles == 0))
    other = train_classifier(
        remaining, replace(recipe, seed=seed + 1000), checkpoint.arch.n_classes
    )
    rows.append(figures("retrain (other seed)", other, None, {}))
    runs: list[tuple[str, str, RemovalOptions, bool]] = [
        ("puma (cold)", "puma", RemovalOptions(), True),
        ("puma", "puma", RemovalOptions(), True),
        ("influence", "influence", RemovalOptions(), True),
    ]
    for scale in scales:
        runs.append((f"puma eta={scale:g}", "puma", RemovalOptions(eta=scale), True))
        runs.append((f"influence eta={scale:g}", "influence", RemovalOptions(eta=scale), True))
    cache = model.with_name(f"{model.stem}.influence.safetensors")
    cache.unlink(missing_ok=True)
    for label, method, options, use_cache in runs:
        report = remove_job.remove(
            model,
            ids_file,
            out,
            method=method,
            options=options,
            use_cache=use_cache,
            overwrite=True,
        )
        net = load_checkpoint(out).model
        rows.append(
            figures(
                label,
                net,
                report.seconds,
                {
                    "eta_scale": report.eta_scale,
                    "cached": report.cached,
                    "criterion_before": report.criterion_before,
                    "criterion_after": report.criterion_after,
                    "warnings": report.warnings,
                },
            )
        )
    p_test = torch.softmax(predict_logits(retrained, test.X).double(), dim=1)
    p_marked = torch.softmax(predict_logits(retrained, marked.X).double(), dim=1)
    nets = {"original": checkpoint.model, "retrain (other seed)": other}
    for row in rows:
        net = nets.get(row["method"])
        if row["method"] == "retrain":
            row["kl_test"] = row["kl_marked"] = 0.0
            continue
        if net is None:
            remove_job.remove(
                model,
                ids_file,
                out,
                method="puma" if row["method"].startswith("puma") else "influence",
                options=RemovalOptions(eta=row["eta_scale"]),
                overwrite=True,
            )
            net = load_checkpoint(out).model
        row["kl_test"] = kl(p_test, predict_logits(net, test.X))
        row["kl_marked"] = kl(p_marked, predict_logits(net, marked.X))
    retrain_seconds = ref.seconds
    for row in rows:
        row["time_ratio"] = row["seconds"] / retrain_seconds if row["seconds"] is not None else None
    return rows


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    order: list[tuple[str, str, str]] = []
    for row in rows:
        key = (row["dataset"], row["marking"], row["method"])
        if key not in groups:
            order.append(key)
        groups[key].append(row)
    lines = [
        "| dataset | marking | method | test acc | marked acc | marked loss | KL test | KL marked | time / retrain | eta scale |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = groups[key]
        ratio = [r["time_ratio"] for r in g if r["time_ratio"] is not None]
        scale = [r["eta_scale"] for r in g if r.get("eta_scale") is not None]
        lines.append(
            f"| {key[0]} | {key[1]} (n={g[0]['n_marked']}) | {key[2]} | "
            f"{100 * mean([r['test_accuracy'] for r in g]):.2f} | "
            f"{100 * mean([r['marked_accuracy'] for r in g]):.1f} | "
            f"{mean([r['marked_loss'] for r in g]):.4f} | {mean([r['kl_test'] for r in g]):.5f} | "
            f"{mean([r['kl_marked'] for r in g]):.5f} | "
            f"{f'{mean(ratio):.3f}' if ratio else '-'} | {f'{mean(scale):g}' if scale else '-'} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> str:
    """The issue's targets, each with its measured figure, per dataset."""
    by: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by[(r["dataset"], r["marking"], r["seed"])][r["method"]] = r
    lines = [
        "| dataset | cold / retrain (worst) | cached s (worst) | cached / retrain (worst) "
        "| test acc drop, points (worst) | KL orig / KL puma, k-means | KL noise floor / KL orig, k-means "
        "| held-out loss rise per marked loss rise, influence / puma (eta 4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        cases = [g for key, g in by.items() if key[0] == dataset]
        cold = max(g["puma (cold)"]["time_ratio"] for g in cases)
        cached_s = max(g["puma"]["seconds"] for g in cases)
        cached_ratio = max(g["puma"]["time_ratio"] for g in cases)
        drop = max(
            100 * (g["original"]["test_accuracy"] - g["puma"]["test_accuracy"]) for g in cases
        )
        kmeans = [g for key, g in by.items() if key[0] == dataset and key[1] == "kmeans"]
        kl_ratio = mean(
            [
                (g["original"]["kl_test"] + g["original"]["kl_marked"])
                / max(g["puma"]["kl_test"] + g["puma"]["kl_marked"], 1e-12)
                for g in kmeans
            ]
        )
        floor = mean(
            [
                (g["retrain (other seed)"]["kl_test"] + g["retrain (other seed)"]["kl_marked"])
                / max(g["original"]["kl_test"] + g["original"]["kl_marked"], 1e-12)
                for g in kmeans
            ]
        )
        slopes = []
        for g in cases:
            if "puma eta=4" not in g:
                continue
            rise = []
            for method in ("influence eta=4", "puma eta=4"):
                run = g[method]
                marked = run["marked_loss"] - g["original"]["marked_loss"]
                criterion = run["criterion_after"] - run["criterion_before"]
                test = run["test_loss"] - g["original"]["test_loss"]
                rise.append((criterion / marked, test / marked) if marked > 0 else (np.nan, np.nan))
            slopes.append(rise)
        slope = "-"
        if slopes:
            c_i, c_p = (mean([s[k][0] for s in slopes]) for k in (0, 1))
            t_i, t_p = (mean([s[k][1] for s in slopes]) for k in (0, 1))
            slope = f"criterion {c_i:.4f} / {c_p:.4f}; test {t_i:.4f} / {t_p:.4f}"
        lines.append(
            f"| {dataset} | {cold:.3f} | {cached_s:.3f} | {cached_ratio:.3f} | {drop:.2f} | "
            f"{kl_ratio:.2f} | {floor:.2f} | {slope} |"
        )
    return "\n".join(lines) + (
        "\n\nTargets: cold <= 0.4x retraining; cached <= 0.3 s; test accuracy within 1 point; "
        "KL to retrain (test + marked) >= 4x below the original's on k-means markings; held-out "
        "loss rising >= 2x less per unit of marked-loss rise with puma than with influence "
        "(criterion: the validation split PUMA holds; test: data neither method saw). "
        "A noise floor above 1 means two retrains with different seeds differ more than the "
        "original differs from the retrain: the original is then already within seed noise of "
        "the reference."
    )


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--markings", nargs="*", default=list(MARKINGS))
        parser.add_argument("--scales", nargs="*", type=float, default=[4.0])

    args = arguments(__doc__, "removal.md", DATASETS, seeds=3, extra=options)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    cases = [
        (name, marking, seed)
        for name in args.datasets
        for marking in args.markings
        for seed in range(args.seeds)
    ]
    rows = run_cases(cases, lambda n, m, s, work: run_case(n, m, s, work, args.scales))
    text = (
        f"# Removal benchmark\n\n{invocation(__file__)}"
        f" — {args.seeds} seed(s), {time.perf_counter() - started:.0f} s on "
        f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.\n\n"
        "Means over seeds. KL is KL(retrain || method), averaged over points; the "
        "'retrain (other seed)' row is the noise floor. Times are in-process, as a ratio to "
        "the retraining measured in the same run.\n\n## Targets\n\n"
        + targets(rows)
        + "\n\n## Results\n\n"
        + summarise(rows)
        + "\n"
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
