"""Forgetting benchmark: every removal method on every sample set, through `puma compare`.

For each dataset, marking (one k-means cluster per class, or 5 % at random) and seed: the
paper's model is trained (`TrainRecipe(arch, seed)`, 100 epochs), then `compare` runs every
method that applies at its defaults beside retraining, plus PUMA's `--forget` variants
(`none`, the paper's, and `repair`) and curvatures (`ggn`, `kfac`) for choosing its
defaults. Reported, as means over seeds: test accuracy,
the marked rows' loss beside retraining's and the gap between them, KL(retrained ||
method) on the marked rows beside the seed-to-seed noise floor, the loss attack's AUC on
the marked rows, and time as a ratio to retraining measured in the same run. Then the
targets: PUMA's marked-loss gap against the paper's (`--forget none`), its time and accuracy,
and `compare`'s own overhead: (its wall time - the methods' own) / one retraining.

A U-LiRA section follows: on German Credit and Breast Cancer (5 % at random, seed 0),
each method's removal audited with `attack --attack u-lira` (8, 16 and 32 shadows for
retraining and PUMA, to choose the default count; 16 for the others).

    python benchmarks/forgetting.py                          # everything
    python benchmarks/forgetting.py --datasets radial --seeds 1 --out /tmp/f.md
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from harness import DATA, arguments, invocation, run_cases, table, write_results
from removal import DATASETS, marked_ids

from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import write_ids
from puma_cli.jobs import train as train_job
from puma_cli.jobs.attack import attack
from puma_cli.jobs.compare import compare
from puma_cli.jobs.remove import remove
from puma_cli.models.recipe import TrainRecipe
from puma_cli.unlearn import RemovalOptions

MARKINGS = ("kmeans", "random5")
VARIANTS = {  # `puma` itself runs at its default, --forget step
    "puma-none": ("puma", {"forget": "none"}),  # the paper's Algorithm 1, as before
    "puma-match": ("puma", {"forget": "match"}),
    "puma-repair": ("puma", {"forget": "repair"}),
    "puma-ggn": ("puma", {"curvature": "ggn"}),
    "puma-kfac": ("puma", {"curvature": "kfac"}),
}


def train_and_mark(name: str, marking: str, seed: int, work: Path) -> tuple[Path, Path]:
    """The paper's model of `name`, trained with `seed`, and an ids file of its marking."""
    stem, suffix, arch = DATASETS[name]
    train_path, test_path = DATA / f"{stem}-train{suffix}", DATA / f"{stem}-test{suffix}"
    model = work / f"{name}-{marking}-{seed}.safetensors"
    train_job.train(train_path, model, TrainRecipe(arch=arch, seed=seed), test=test_path,
                    overwrite=True)  # fmt: skip
    checkpoint = load_checkpoint(model)
    train = load_dataset(train_path)
    ids_file = work / f"{name}-{marking}-{seed}.txt"
    write_ids(ids_file, marked_ids(train.subset(np.flatnonzero(checkpoint.roles == 0)),
                                   marking, seed))  # fmt: skip
    return model, ids_file


def run_case(name: str, marking: str, seed: int, work: Path) -> list[dict[str, Any]]:
    model, ids_file = train_and_mark(name, marking, seed, work)
    variants = {label: (method, RemovalOptions(seed=seed, **extra))
                for label, (method, extra) in VARIANTS.items()}  # fmt: skip
    started = time.perf_counter()
    report = compare(model, ids_file, out_dir=work / f"{name}-{marking}-{seed}", seed=seed,
                     overwrite=True, variants=variants)  # fmt: skip
    wall = time.perf_counter() - started
    own = sum(r.seconds or 0.0 for r in report.methods if r.method != "retrain")
    retrained = next(r for r in report.methods if r.method == "retrain")
    rows = []
    for r in report.methods:
        rows.append(
            {
                "dataset": name,
                "marking": marking,
                "seed": seed,
                "method": r.method,
                "n_marked": report.n_marked,
                "refused": r.refused,
                "test_accuracy": r.test_accuracy,
                "marked_accuracy": r.marked_accuracy,
                "marked_loss": r.marked_loss,
                "retrain_marked_loss": retrained.marked_loss,
                "gap": None if r.marked_loss is None or retrained.marked_loss is None
                else abs(r.marked_loss - retrained.marked_loss),
                "kl_marked": r.kl_marked,
                "kl_test": r.kl_test,
                "noise_floor_kl_marked": report.noise_floor_kl_marked,
                "loss_auc": r.loss_auc,
                "time_ratio": r.time_ratio,
                "retrain_seconds": report.retrain_seconds,
                "compare_seconds": wall,
                "compare_overhead_ratio": (wall - own) / report.retrain_seconds,
            }
        )  # fmt: skip
    return rows


ULIRA_SETS = ("german-credit", "breast-cancer")
AUDITED = ("retrain", "puma", "puma-none", "finetune", "neggrad", "random-labels", "salun",
                 "scrub", "ssd")  # fmt: skip
ULIRA_SHADOWS = (8, 16, 32)  # for retrain and puma; the others at 16


def run_ulira(name: str, seed: int, work: Path) -> list[dict[str, Any]]:
    """U-LiRA on each method's removal of 5 % at random (a membership signal to hide)."""
    model, ids_file = train_and_mark(name, "random5", seed, work)
    rows = []
    for label in AUDITED:
        method, extra = VARIANTS.get(label, (label, {}))
        out = work / f"{name}-ulira-{label}.safetensors"
        remove(model, ids_file, out, method=method, options=RemovalOptions(seed=seed, **extra),
               use_cache=False, overwrite=True)  # fmt: skip
        for count in ULIRA_SHADOWS if label in ("retrain", "puma") else (16,):
            started = time.perf_counter()
            report = attack(out, ids_file, method="u-lira", shadows=count, seed=seed)
            rows.append({"dataset": name, "method": label, "shadows": count,
                         "accuracy": report.accuracy, "auc": report.auc,
                         "forgetting_score": report.forgetting_score,
                         "model_flagged": report.model_flagged,
                         "seconds": time.perf_counter() - started})  # fmt: skip
    return rows


def ulira_section(rows: list[dict[str, Any]]) -> str:
    body = [[r["dataset"], r["method"], r["shadows"], cell(r["accuracy"]), cell(r["auc"]),
             cell(r["forgetting_score"]), cell(r["model_flagged"]), f"{r['seconds']:.0f}"]
            for r in rows]  # fmt: skip
    text = table(["dataset", "method", "shadows", "U-LiRA accuracy", "AUC", "forgetting score",
                  "targets flagged on the model", "seconds"], body)  # fmt: skip
    lines = ["", "## U-LiRA (5 % marked at random, seed 0)", "",
             "Accuracy and AUC 0.5: the attacker cannot tell the method's removal from "
             "retraining. The forgetting score is biased low at these shadow counts (see the "
             "README): read it against retraining's at the same count.", "", text, ""]  # fmt: skip
    for dataset in ULIRA_SETS:
        at = {(r["method"], r["shadows"]): r["accuracy"] for r in rows if r["dataset"] == dataset}
        if ("puma", 16) in at and ("retrain", 16) in at:
            gap = abs(at[("puma", 16)] - at[("retrain", 16)])
            lines.append(f"- {dataset}: |U-LiRA accuracy against puma - against retraining| at "
                         f"16 shadows = {gap:.3f} (target: within 0.1).")  # fmt: skip
    return "\n".join(lines)


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(rows: list[dict[str, Any]], seconds: float) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["marking"], row["method"])].append(row)
    lines = [
        "# Forgetting benchmark",
        "",
        f"Produced by {invocation(__file__)} in {seconds:.0f} s on 2 CPU cores. Means over "
        f"{len({r['seed'] for r in rows})} seeds. `gap` is |marked loss - retraining's|; "
        "`KL m` is KL(retrained || method) on the marked rows, beside `floor`, the same "
        "between two retrainings with different seeds; `loss AUC` is the loss attack's on "
        "the marked rows against the test rows (retraining's own is the reference, not "
        "0.5: a removed cluster has a higher loss than the test rows); `time` is the "
        "method's time / retraining's in the same run.",
        "",
    ]
    body = []
    for (dataset, marking, method), g in groups.items():
        refused = sum(1 for r in g if r["refused"])
        body.append([
            dataset, f"{marking} (n={g[0]['n_marked']})",
            method + (f" (refused {refused}/{len(g)})" if refused else ""),
            cell(mean([r["test_accuracy"] for r in g])),
            cell(mean([r["marked_accuracy"] for r in g])),
            cell(mean([r["marked_loss"] for r in g])), cell(mean([r["gap"] for r in g])),
            cell(mean([r["kl_marked"] for r in g]), 4),
            cell(mean([r["noise_floor_kl_marked"] for r in g]), 4),
            cell(mean([r["loss_auc"] for r in g])), cell(mean([r["time_ratio"] for r in g])),
        ])  # fmt: skip
    lines.append(table(["dataset", "marking", "method", "test acc", "marked acc", "marked loss",
                        "gap", "KL m", "floor", "loss AUC", "time"], body))  # fmt: skip
    lines += ["", "## Targets", "", _targets(rows), ""]
    return "\n".join(lines)


def _targets(rows: list[dict[str, Any]]) -> str:
    """Each method's gap against PUMA's with --forget none (the paper's Algorithm 1 and
    its guard, puma's default before --forget), over every (dataset, marking, seed)."""

    def of(method: str, key: str) -> list[float | None]:
        return [r[key] for r in rows if r["method"] == method and not r["refused"]]

    originals = {(r["dataset"], r["marking"], r["seed"]): r["test_accuracy"]
                 for r in rows if r["method"] == "original"}  # fmt: skip
    today = mean(of("puma-none", "gap"))
    out = []
    for method in ("puma-none", "puma", *list(VARIANTS)[1:], "influence", "finetune", "neggrad",
                   "random-labels", "salun", "scrub", "ssd"):  # fmt: skip
        drops = [originals[(r["dataset"], r["marking"], r["seed"])] - r["test_accuracy"]
                 for r in rows if r["method"] == method and not r["refused"]]  # fmt: skip
        gap = mean(of(method, "gap"))
        by_marking = [
            cell(mean([r["gap"] for r in rows if r["method"] == method and not r["refused"]
                       and r["marking"] == marking]))
            for marking in MARKINGS
        ]  # fmt: skip
        refused = sum(1 for r in rows if r["method"] == method and r["refused"])
        out.append([
            method, cell(gap), *by_marking,
            cell(gap / today if gap is not None and today else None, 2),
            cell(mean(of(method, "time_ratio"))),
            cell(max(of(method, "time_ratio"), default=None)),
            cell(100 * max(drops) if drops else None, 1), str(refused),
        ])  # fmt: skip
    overhead = [r["compare_overhead_ratio"] for r in rows if r["method"] == "retrain"]
    text = table(["method", "mean gap", *(f"gap, {m}" for m in MARKINGS), "gap / puma-none's", "mean time", "worst time",
                  "worst test drop (points)", "refused"], out)  # fmt: skip
    text += (
        f"\n\n`compare`'s overhead, (wall time - the methods' own time) / one retraining: "
        f"mean {statistics.fmean(overhead):.2f}, worst {max(overhead):.2f} "
        "(the target is within 3: the reference retraining, the noise-floor one, and the "
        "evaluations)."
    )
    return text


def main() -> None:
    args = arguments(
        __doc__,
        "forgetting.md",
        DATASETS,
        seeds=3,
        extra=lambda p: p.add_argument("--markings", nargs="*", default=list(MARKINGS)),
    )
    started = time.perf_counter()
    cases = [(d, m, s) for d in args.datasets for m in args.markings for s in range(args.seeds)]
    rows = run_cases(cases, run_case)
    audits = run_cases([(d, 0) for d in ULIRA_SETS if d in args.datasets], run_ulira)
    text = summarise(rows, time.perf_counter() - started) + ulira_section(audits)  # both parts
    write_results(args.out, text, [*rows, *audits])


if __name__ == "__main__":
    main()
