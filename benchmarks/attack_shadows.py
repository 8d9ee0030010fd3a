"""How many shadow models do LiRA and Shokri need to carry a signal on the sample data?

For each dataset: train the default recipe, take a random 10 % of the rows it trained on
as targets (members) and the test split as non-members, and run the loss attack and
LiRA (offline and online) and Shokri with 4, 8, 16 and 32 shadows. Chance is AUC 0.5.

    python benchmarks/attack_shadows.py [--datasets radial german-credit] [--counts 4 8 16 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import DATA, arguments, invocation, run_cases, table, write_results

from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.ids import write_ids
from puma_cli.jobs import train as train_job
from puma_cli.jobs.attack import attack
from puma_cli.models.recipe import TrainRecipe


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--counts", nargs="*", type=int, default=[4, 8, 16, 32])

    args = arguments(
        __doc__, "attack_shadows.md", ["radial", "breast-cancer", "german-credit"], extra=options
    )
    started = time.perf_counter()
    rows = run_cases(
        [(name,) for name in args.datasets], lambda n, w: run_dataset(n, args.counts, w)
    )
    lines = [
        (
            r["dataset"],
            r["attack"],
            r["shadows"] or "-",
            f"{r['auc']:.3f}",
            r["tpr_at_1pct_fpr"] if r["tpr_at_1pct_fpr"] is not None else "-",
            f"{r['member_rate']:.2f}",
            f"{r['nonmember_rate']:.2f}",
            f"{r['seconds']:.1f}",
        )
        for r in rows
    ]
    header = (
        "dataset",
        "attack",
        "shadows",
        "AUC",
        "TPR at 1 % FPR",
        "member rate",
        "non-member rate",
        "seconds",
    )
    text = (
        f"# Shadow count (LiRA and Shokri)\n\n{invocation(__file__)} — "
        f"{time.perf_counter() - started:.0f} s on the CPU, torch {torch.__version__}.\n\n"
        "Targets: a random 10 % of the rows each model trained on (members); non-members: the "
        "test split. Seconds include training the shadows (each count trains its own set).\n\n"
        + table(header, lines)
        + "\n"
    )
    write_results(args.out, text)


def run_dataset(name: str, counts: list[int], work: Path) -> list[dict[str, Any]]:
    """Train the default model, then attack a random tenth of its rows with each attack."""
    model = work / f"{name}.safetensors"
    train_job.train(
        DATA / f"{name}-train.csv", model, TrainRecipe(), test=DATA / f"{name}-test.csv"
    )
    checkpoint = ckpt.load_checkpoint(model)
    dataset = recorded.load_recorded_dataset(checkpoint, "train")
    trained = np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED)
    chosen = np.random.default_rng(0).choice(trained, size=len(trained) // 10, replace=False)
    write_ids(work / "targets.txt", dataset.ids[chosen].tolist())
    rows = []
    for method, count in [("loss", 0)] + [
        (m, c) for c in counts for m in ("lira", "lira-online", "shokri")
    ]:
        t0 = time.perf_counter()
        report = attack(model, work / "targets.txt", method=method, shadows=max(count, 2))
        rows.append(
            {
                "dataset": name,
                "attack": method,
                "shadows": count,
                "auc": report.auc,
                "tpr_at_1pct_fpr": report.tpr_at_1pct_fpr,
                "member_rate": report.member_rate,
                "nonmember_rate": report.nonmember_rate,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


if __name__ == "__main__":
    main()
