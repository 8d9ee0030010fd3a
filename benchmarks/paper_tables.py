"""The paper's Table 1, Table 2 and Figure 3, with the columns the paper left out.

For each dataset, seed, scenario (ordered: the marked rows grouped into few batches and
shards at training time; random: not) and removed share (20/40/60/80 % of the rows
trained on, marked at random): train the originals, then remove with retrain, SISA
(5 shards, 1 slice), Amnesiac, SSD (alpha 10, lambda 1), influence and PUMA, and report

- Table 1: test accuracy after removal (the original's beside it);
- Table 2: the Shokri attack's member rate on the removed points before and after, and,
  for honesty, its member rate on non-members (the test split) after, LiRA's AUC and
  TPR at 1 % FPR after (removed points against the test split);
- Figure 3: removal time as a ratio to retraining's, measured in the same case;
- KL(retrain || method) on the test split, beside the noise floor KL(retrain ||
  retrain with another seed).

Amnesiac, PUMA, influence, SSD and retrain share one single-model original per case
(trained with --record-updates, and --group-ids in the ordered scenario); SISA has its
own. Attacks use 8 shadow models per recipe, shared by every model of a dataset and seed.

    python benchmarks/paper_tables.py                      # ~20 min on 2 cores
    python benchmarks/paper_tables.py --datasets radial --fractions 0.2 --seeds 0 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import DATA, arguments, invocation, run_cases, write_results
from removal import kl

from puma_cli.data.marking import random_marking
from puma_cli.io.checkpoint import ROLE_TRAINED, load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import write_ids
from puma_cli.jobs import remove as remove_job
from puma_cli.jobs import train as train_job
from puma_cli.jobs.attack import attack
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.unlearn import RemovalOptions

DATASETS = ("radial", "rectangular", "german-credit", "breast-cancer")
METHODS = ("retrain", "sisa", "amnesiac", "ssd", "influence", "puma")
PAPER = RemovalOptions(forget="none")  # the paper's Algorithm 1 and its guarded step
SHARDS = 5
SHADOWS = 8


def run_case(
    name: str, scenario: str, fraction: float, seed: int, work: Path
) -> list[dict[str, Any]]:
    train_path, test_path = DATA / f"{name}-train.csv", DATA / f"{name}-test.csv"
    train, test = load_dataset(train_path), load_dataset(test_path)
    # The validation split depends only on the seed, so the marking can be drawn first.
    probe = work / f"probe-{seed}.safetensors"
    if not probe.exists():
        train_job.train(train_path, probe, TrainRecipe(epochs=1, seed=seed))
    trained_rows = np.flatnonzero(load_checkpoint(probe).roles == ROLE_TRAINED)
    rows = trained_rows[random_marking(len(trained_rows), fraction, seed)]
    ids_file = work / f"marked-{scenario}-{fraction}-{seed}.txt"
    write_ids(ids_file, train.ids[rows].tolist())
    group = ids_file if scenario == "ordered" else None
    tag = f"{scenario}-{fraction}" if scenario == "ordered" else "random"
    single = work / f"{name}-{tag}-{seed}.safetensors"
    sisa = work / f"{name}-{tag}-{seed}-sisa.safetensors"
    if not single.exists():
        recipe = TrainRecipe(seed=seed)
        train_job.train(
            train_path, single, recipe, test=test_path, group=group, record_updates=True
        )
        train_job.train(
            train_path, sisa, TrainRecipe(seed=seed, shards=SHARDS), test=test_path, group=group
        )
    before = {
        "single": attack(single, ids_file, method="shokri", shadows=SHADOWS, seed=seed),
        "sisa": attack(sisa, ids_file, method="shokri", shadows=SHADOWS, seed=seed),
    }
    original_accuracy = {
        key: float(load_checkpoint(path).metrics["test"]["accuracy"])
        for key, path in (("single", single), ("sisa", sisa))
    }
    X_test = test.X
    outcomes: dict[str, Any] = {}
    for method in METHODS:
        source = sisa if method == "sisa" else single
        out = work / f"out-{method}.safetensors"
        report = remove_job.remove(
            source, ids_file, out, method=method, options=PAPER, use_cache=False, overwrite=True
        )
        shokri = attack(out, ids_file, method="shokri", shadows=SHADOWS, seed=seed)
        lira = attack(out, ids_file, method="lira", shadows=SHADOWS, seed=seed)
        logits = predict_logits(load_checkpoint(out).model, X_test)
        outcomes[method] = (report, shokri, lira, logits)
    reference = torch.softmax(outcomes["retrain"][3].double(), dim=1)
    # The noise floor: the same remaining rows, another seed (validation split kept).
    floor_model = _retrain_with_seed(single, ids_file, seed + 100, work)
    floor = kl(reference, predict_logits(floor_model, X_test))
    rows_out = []
    for method, (report, shokri, lira, logits) in outcomes.items():
        key = "sisa" if method == "sisa" else "single"
        rows_out.append(
            {
                "dataset": name,
                "scenario": scenario,
                "fraction": fraction,
                "seed": seed,
                "method": method,
                "original_accuracy": original_accuracy[key],
                "accuracy": report.test_accuracy_after,
                "seconds": report.seconds,
                "retrain_seconds": outcomes["retrain"][0].seconds,
                "member_rate_before": before[key].member_rate,
                "member_rate_after": shokri.member_rate,
                "nonmember_rate_after": shokri.nonmember_rate,
                "lira_auc": lira.auc,
                "lira_tpr_1pct": lira.tpr_at_1pct_fpr,
                "kl_to_retrain": kl(reference, logits) if method != "retrain" else 0.0,
                "kl_noise_floor": floor,
                "parameters": report.parameters if method != "retrain" else {},
            }
        )
    return rows_out


def _retrain_with_seed(model: Path, ids_file: Path, seed: int, work: Path) -> torch.nn.Module:
    """Retrain the remaining rows of `model` with another training seed."""
    from dataclasses import replace

    from puma_cli.io.ids import read_ids, rows_for_ids
    from puma_cli.io.recorded import load_recorded_dataset
    from puma_cli.models.training import train_classifier

    checkpoint = load_checkpoint(model)
    dataset = load_recorded_dataset(checkpoint, "train")
    marked = rows_for_ids(dataset, read_ids(ids_file), ids_file)
    keep = np.setdiff1d(np.flatnonzero(checkpoint.roles == ROLE_TRAINED), marked)
    recipe = replace(TrainRecipe.from_dict(checkpoint.recipe), seed=seed)
    return train_classifier(dataset.subset(keep), recipe, checkpoint.arch.n_classes)


def mean_sd(values: list[float]) -> str:
    clean = [v for v in values if v is not None]
    if not clean:
        return "-"
    if len(clean) == 1:
        return f"{clean[0]:.2f}"
    return f"{statistics.mean(clean):.2f} ± {statistics.stdev(clean):.2f}"


def tables(rows: list[dict[str, Any]], fractions: list[float]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["scenario"], row["method"])].append(row)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    out = ["## Table 1: test accuracy (%) after removing a share of the training rows\n"]
    head = " | ".join(f"{int(100 * f)} %" for f in fractions)
    for scenario in ("ordered", "random"):
        out += [
            f"\n### {scenario}\n",
            f"| dataset | method | original | {head} |",
            "|---|---|---|" + "---|" * len(fractions),
        ]
        for name in datasets:
            for method in METHODS:
                cases = groups.get((name, scenario, method), [])
                if not cases:
                    continue
                cells = [
                    mean_sd([100 * c["accuracy"] for c in cases if c["fraction"] == f])
                    for f in fractions
                ]
                original = mean_sd([100 * c["original_accuracy"] for c in cases])
                out.append(f"| {name} | {method} | {original} | {' | '.join(cells)} |")
    out += [
        "\n## Table 2: membership of the removed rows, Shokri attack (%), and LiRA after\n",
        "Member rate before / after: share of the removed rows the attack calls members. "
        "Non-members after: the same share on the test split; a removal has worked when the "
        "two are close. Averaged over shares and seeds.\n",
    ]
    for scenario in ("ordered", "random"):
        out += [
            f"\n### {scenario}\n",
            "| dataset | method | member before | member after | non-members after | "
            "LiRA AUC after | LiRA TPR at 1 % FPR | KL to retrain | KL noise floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in datasets:
            for method in METHODS:
                cases = groups.get((name, scenario, method), [])
                if not cases:
                    continue
                out.append(
                    f"| {name} | {method} | "
                    f"{mean_sd([100 * c['member_rate_before'] for c in cases])} | "
                    f"{mean_sd([100 * c['member_rate_after'] for c in cases])} | "
                    f"{mean_sd([100 * c['nonmember_rate_after'] for c in cases])} | "
                    f"{mean_sd([c['lira_auc'] for c in cases])} | "
                    f"{mean_sd([c['lira_tpr_1pct'] for c in cases])} | "
                    f"{mean_sd([c['kl_to_retrain'] for c in cases])} | "
                    f"{mean_sd([c['kl_noise_floor'] for c in cases])} |"
                )
    out += [
        "\n## Figure 3: removal time over retraining time (same case, same run)\n",
        "| dataset | scenario | " + " | ".join(METHODS) + " | retrain seconds |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for name in datasets:
        for scenario in ("ordered", "random"):
            cells = []
            for method in METHODS:
                cases = groups.get((name, scenario, method), [])
                cells.append(mean_sd([c["seconds"] / c["retrain_seconds"] for c in cases]))
            retrain = groups.get((name, scenario, "retrain"), [])
            out.append(
                f"| {name} | {scenario} | {' | '.join(cells)} | "
                f"{mean_sd([c['seconds'] for c in retrain])} |"
            )
    return "\n".join(out) + "\n"


def plots(rows: list[dict[str, Any]], fractions: list[float], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    written = []
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(3.2 * len(datasets), 5.6), squeeze=False, sharey=True
    )
    for j, name in enumerate(datasets):
        for i, scenario in enumerate(("ordered", "random")):
            ax = axes[i][j]
            for method in METHODS:
                ys = [
                    statistics.mean(
                        100 * r["accuracy"]
                        for r in rows
                        if (r["dataset"], r["scenario"], r["method"], r["fraction"])
                        == (name, scenario, method, f)
                    )
                    for f in fractions
                ]
                ax.plot([100 * f for f in fractions], ys, marker="o", label=method)
            ax.set_title(f"{name}, {scenario}", fontsize=9)
            ax.set_xlabel("removed (%)")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "paper_table1.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for i, scenario in enumerate(("ordered", "random")):
        ax = axes[0][i]
        width = 0.8 / len(datasets)
        for j, name in enumerate(datasets):
            ratios = [
                statistics.mean(
                    r["seconds"] / r["retrain_seconds"]
                    for r in rows
                    if (r["dataset"], r["scenario"], r["method"]) == (name, scenario, method)
                )
                for method in METHODS
            ]
            ax.bar(np.arange(len(METHODS)) + j * width, ratios, width, label=name)
        ax.set_xticks(np.arange(len(METHODS)) + 0.4 - width / 2, METHODS, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"removal time / retrain time, {scenario}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "paper_figure3.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    return written


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fractions", nargs="*", type=float, default=[0.2, 0.4, 0.6, 0.8])
        parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])

    args = arguments(__doc__, "paper_tables.md", DATASETS, extra=options)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        for seed in args.seeds:
            # One folder per dataset and seed: its cases share the trained models.
            cases = [(name, s, f, seed) for s in ("ordered", "random") for f in args.fractions]
            rows += run_cases(cases, run_case)
    body = tables(rows, args.fractions)
    pictures = plots(rows, args.fractions, args.out.parent)
    text = (
        f"# The paper's tables, measured\n\n{invocation(__file__)}: "
        f"{time.perf_counter() - started:.0f} s on the CPU, "
        f"torch {torch.__version__}, seeds {args.seeds}. Values are mean ± sd over seeds. "
        f"Plots: {', '.join(p.name for p in pictures)}.\n\n" + body
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
