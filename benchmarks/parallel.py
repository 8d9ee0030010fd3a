"""`torchrun` against one process: the same removal and attack, their time and agreement.

    python benchmarks/parallel.py [--epochs 20] [--processes 2]

For each case a model is trained by `puma train` (synthetic 10-class mixture, as in
`scale.py`), 1 % of its rows marked at random; then, in fresh processes and without
caches: `remove` in one process (all cores), in one process on one thread (what each
torchrun process gets), and under `torchrun --nproc-per-node K` (gloo, one thread each).
Reported: the job's own seconds, the ratio of torchrun's to one process's, and the largest
difference between the two models' weights. The attack case trains LiRA's shadow models
(split over the processes) and compares the AUCs. On a 2-core machine the processes share
the cores one process would use, so the figures measure overhead and agreement, not a
speed-up; on a machine with more cores (or GPUs) than one process can use, they are the
way to use them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import RESULTS, ROOT, invocation, table, write_results
from safetensors.torch import load_file
from scale import gaussian_mixture

# name: (rows, features, hidden widths, curvature); rows 0: the digits CNN (sample_data),
# a float32 conv net, where EK-FAC's eigenbasis is the most sensitive to rounding.
CASES: dict[str, tuple[int, int, str, str]] = {
    "mlp-70k-20k-kfac": (20_000, 100, "320,96", "kfac"),
    "mlp-70k-20k-ekfac": (20_000, 100, "320,96", "ekfac"),
    "mlp-2k-20k-exact": (20_000, 20, "64", "exact"),
    "cnn-digits-ekfac": (0, 0, "32", "ekfac"),
}


def puma(args: list[str], processes: int = 0, threads: int | None = None) -> dict[str, Any]:
    """One CLI run in fresh processes (torchrun when `processes`): its JSON report."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable, "-m", "puma_cli"]
    if processes:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(processes), "-m", "puma_cli"]  # fmt: skip
        env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [*launcher, *args, "--json", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"puma {' '.join(args)} failed: {result.stderr[-2000:]}")
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def largest_difference(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    return max(
        float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point()
    )


def measure(name: str, epochs: int, processes: int, folder: Path) -> dict[str, Any]:
    rows, features, hidden, curvature = CASES[name]
    train, test = folder / f"{name}.npz", folder / f"{name}-test.npz"
    arch = ["--hidden", hidden]
    if rows:
        np.savez(train, **gaussian_mixture(rows, features, 0))
        np.savez(test, **gaussian_mixture(2_000, features, 1))
    else:
        train, test = ROOT / "sample_data/digits-train.npz", ROOT / "sample_data/digits-test.npz"
        arch += ["--arch", "cnn"]
    model = folder / f"{name}.safetensors"
    trained = puma(["train", str(train), "--test", str(test), "-o", str(model), "--epochs",
                    str(epochs), "--batch-size", "128", *arch, "--overwrite"])  # fmt: skip
    marked = folder / f"{name}-ids.txt"
    puma(["mark", str(train), "--random", "0.01", "-o", str(marked), "--overwrite"])
    base = ["remove", "-m", str(model), "--marked", str(marked), "--curvature", curvature]
    base += ["--no-cache", "--overwrite"]
    one = puma([*base, "-o", str(folder / "one.safetensors")])
    single = puma([*base, "-o", str(folder / "single.safetensors")], threads=1)
    many = puma([*base, "-o", str(folder / "many.safetensors")], processes=processes)
    return {
        "case": name,
        "rows": int(trained["n_train"]),
        "parameters": int(trained["n_parameters"]),
        "processes": processes,
        "one_process_seconds": one["seconds"],
        "one_thread_seconds": single["seconds"],
        "torchrun_seconds": many["seconds"],
        "ratio": many["seconds"] / one["seconds"],
        "ratio_to_one_thread": many["seconds"] / single["seconds"],
        "largest_weight_difference": largest_difference(
            folder / "one.safetensors", folder / "many.safetensors"
        ),
        "largest_weight_difference_one_thread": largest_difference(
            folder / "single.safetensors", folder / "many.safetensors"
        ),
        "largest_step": largest_difference(model, folder / "one.safetensors"),
        "marked_loss_one": one["marked_loss_after"],
        "marked_loss_torchrun": many["marked_loss_after"],
        "eta_scale_one": one["eta_scale"],
        "eta_scale_torchrun": many["eta_scale"],
    }


def measure_attack(processes: int, folder: Path) -> dict[str, Any]:
    data = folder / "radial.csv"
    puma(["make-data", "radial", "-o", str(data), "--test-frac", "0.2", "--overwrite"])
    model = folder / "radial.safetensors"
    puma(["train", str(data), "--test", str(folder / "radial-test.csv"), "-o", str(model),
          "--overwrite"])  # fmt: skip
    marked = folder / "radial-ids.txt"
    puma(["mark", str(data), "--random", "0.05", "-o", str(marked), "--overwrite"])
    figures = {}
    for label, count in (("one", 0), ("torchrun", processes)):
        for cache in folder.glob("puma-shadows-*"):
            cache.unlink()
        started = time.perf_counter()
        report = puma(["attack", "-m", str(model), "--targets", str(marked), "--attack", "lira",
                       "--shadows", "8"], processes=count)  # fmt: skip
        figures[label] = (report["auc"], time.perf_counter() - started)
    return {
        "case": "attack lira, 8 shadows, radial",
        "processes": processes,
        "one_process_wall_seconds": figures["one"][1],
        "torchrun_wall_seconds": figures["torchrun"][1],
        "ratio": figures["torchrun"][1] / figures["one"][1],
        "auc_one": figures["one"][0],
        "auc_torchrun": figures["torchrun"][0],
    }


def report(rows: list[dict[str, Any]], attack: dict[str, Any], seconds: float) -> str:
    lines = [
        "# torchrun against one process",
        "",
        f"Produced by {invocation(__file__)} in {seconds:.0f} s on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, gloo. Times are the job's own seconds (files read, "
        "no process start-up); caches off. Weight differences are the largest over every "
        "tensor, against one process on all cores and on one thread (a float32 convolution "
        "rounds otherwise on several threads); the largest step is the largest change PUMA "
        "made to a weight, for scale.",
        "",
        table(
            [
                "case",
                "rows",
                "params",
                "one process (s)",
                "one thread (s)",
                f"torchrun x{rows[0]['processes']} (s)",
                "/ one process",
                "/ one thread",
                "largest weight difference",
                "the same, to one thread",
                "largest step",
                "marked loss one / torchrun",
            ],
            [
                [
                    r["case"],
                    r["rows"],
                    r["parameters"],
                    f"{r['one_process_seconds']:.2f}",
                    f"{r['one_thread_seconds']:.2f}",
                    f"{r['torchrun_seconds']:.2f}",
                    f"{r['ratio']:.2f}",
                    f"{r['ratio_to_one_thread']:.2f}",
                    f"{r['largest_weight_difference']:.1e}",
                    f"{r['largest_weight_difference_one_thread']:.1e}",
                    f"{r['largest_step']:.1e}",
                    f"{r['marked_loss_one']:.4f} / {r['marked_loss_torchrun']:.4f}",
                ]
                for r in rows
            ],
        ),
        "",
        f"LiRA with 8 shadow models on `radial` (wall time, process start-up included): one "
        f"process {attack['one_process_wall_seconds']:.1f} s, torchrun x{attack['processes']} "
        f"{attack['torchrun_wall_seconds']:.1f} s ({attack['ratio']:.2f}x); AUC "
        f"{attack['auc_one']:.6f} and {attack['auc_torchrun']:.6f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel.md")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            rows.append(measure(name, args.epochs, args.processes, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        attack = measure_attack(args.processes, Path(tmp))
    write_results(args.out, report(rows, attack, time.perf_counter() - started), [*rows, attack])


if __name__ == "__main__":
    main()
