"""How many shadow models do LiRA and Shokri need to carry a signal on the sample data?

For each dataset: train the default recipe, take a random 10 % of the rows it trained on
as targets (members) and the test split as non-members, and run the loss attack and
LiRA (offline and online) and Shokri with 4, 8, 16 and 32 shadows. Chance is AUC 0.5.

    python benchmarks/attack_shadows.py [--datasets radial german-credit] [--counts 4 8 16 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.ids import write_ids
from puma_cli.jobs import train as train_job
from puma_cli.jobs.attack import attack
from puma_cli.models.training import TrainRecipe

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="*", default=["radial", "breast-cancer", "german-credit"]
    )
    parser.add_argument("--counts", nargs="*", type=int, default=[4, 8, 16, 32])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "attack_shadows.md"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    lines = [
        "| dataset | attack | shadows | AUC | TPR at 1 % FPR | member rate | non-member rate | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.datasets:
            model = work / f"{name}.safetensors"
            train_job.train(
                DATA / f"{name}-train.csv", model, TrainRecipe(), test=DATA / f"{name}-test.csv"
            )
            checkpoint = ckpt.load_checkpoint(model)
            dataset = recorded.load_recorded_dataset(checkpoint, "train")
            trained = np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED)
            chosen = np.random.default_rng(0).choice(
                trained, size=len(trained) // 10, replace=False
            )
            write_ids(work / "targets.txt", dataset.ids[chosen].tolist())
            runs = [("loss", 0)] + [
                (m, c) for c in args.counts for m in ("lira", "lira-online", "shokri")
            ]
            for method, count in runs:
                t0 = time.perf_counter()
                report = attack(model, work / "targets.txt", method=method, shadows=max(count, 2))
                lines.append(
                    f"| {name} | {method} | {count or '-'} | {report.auc:.3f} | "
                    f"{report.tpr_at_1pct_fpr if report.tpr_at_1pct_fpr is not None else '-'} | "
                    f"{report.member_rate:.2f} | {report.nonmember_rate:.2f} | {time.perf_counter() - t0:.1f} |"
                )
                print(lines[-1], flush=True)
    text = (
        f"# Shadow count (LiRA and Shokri)\n\n`python benchmarks/attack_shadows.py {' '.join(sys.argv[1:])}` — "
        f"{time.perf_counter() - started:.0f} s on the CPU, torch {torch.__version__}.\n\n"
        "Targets: a random 10 % of the rows each model trained on (members); non-members: the "
        "test split. Seconds include training the shadows (each count trains its own set).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
