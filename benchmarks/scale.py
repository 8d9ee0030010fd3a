"""Removal at scale on the CPU: PUMA's cost as a ratio to retraining, measured in one run.

    python benchmarks/scale.py [--cases mlp-2k-10k ...] [--epochs 20]

For each case: synthetic data (a 10-class Gaussian mixture for the MLPs, 3 x 32 x 32
images for ResNet-18, the shipped 8x8 digits for the CNN; for the wide- cases, run
only when named, TF-IDF-like bags of 10,000 or 30,000 words), a model trained by `puma
train`, 1 % of its rows marked at random, then in fresh processes: `remove --method
retrain` (the reference), PUMA cold (no caches), PUMA cached (the same request
again: v, the scores, the guard's figures and, for K-FAC, the factors come from the
caches) and PUMA on another 1 % marking of the same model (`mark --seed 1`: the factors
come from the cache, and v too unless the marking holds validation rows, which leave the
criterion, so v and the scores are computed again). Reported: each method's own time
(the job's `seconds`, excluding reading the files) and its ratio to retraining's, the
process's peak resident memory, test accuracy before and after, and the marked rows'
loss after PUMA beside after retraining. Log-log slopes of the cold cost against rows
(at fixed parameters) and against parameters (at fixed rows) close the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import RESULTS, ROOT, invocation, table, write_results

# name: (kind, rows, features or image side, hidden widths or arch args, curvature)
CASES: dict[str, tuple[str, int, int, str, str]] = {
    "mlp-2k-10k": ("mlp", 10_000, 20, "64", "auto"),
    "mlp-2k-20k": ("mlp", 20_000, 20, "64", "auto"),
    "mlp-2k-40k": ("mlp", 40_000, 20, "64", "auto"),
    "mlp-2k-40k-exact": ("mlp", 40_000, 20, "64", "exact"),
    "mlp-70k-10k": ("mlp", 10_000, 100, "320,96", "auto"),
    "mlp-70k-20k": ("mlp", 20_000, 100, "320,96", "auto"),
    "mlp-70k-40k": ("mlp", 40_000, 100, "320,96", "auto"),
    "mlp-70k-40k-exact": ("mlp", 40_000, 100, "320,96", "exact"),
    "mlp-1m-40k": ("mlp", 40_000, 200, "1024,768", "auto"),
    "cnn-digits": ("digits", 0, 0, "", "auto"),
    "cnn-digits-exact": ("digits", 0, 0, "", "exact"),
    "resnet18-w16-5k": ("resnet18", 5_000, 32, '{"width": 16}', "auto"),
    "resnet18-w16-5k-noisy": ("resnet18", 5_000, 32, '{"width": 16}', "auto"),
    "resnet18-w16-50k-noisy": ("resnet18", 50_000, 32, '{"width": 16}', "auto"),
    # Very wide input layers (README "A very wide input layer"), bag-of-words rows: run
    # with --cases ... --keep, outside the cases and their targets.
    "wide-bow-10k": ("bow", 4_000, 10_000, "64", "auto"),
    "wide-bow-30k": ("bow", 1_500, 30_000, "16", "auto"),
    # The GPU cases (--device cuda): not run by default.
    "gpu-resnet18-50k": ("resnet18", 50_000, 32, '{"width": 64}', "auto"),
    "gpu-densenet-60k": ("densenet", 60_000, 32, "{}", "auto"),
}
GRAY = {"gpu-densenet-60k"}  # the paper's DenseNet takes 1 x 32 x 32 images
# Training labels flipped at random: the clean images are learnt to 100 % and the model
# then generalises perfectly (a retrained model fits the marked rows as well as the
# original: nothing to remove); flipped labels give rows only their own training explains.
LABEL_NOISE = {"resnet18-w16-5k-noisy": 0.1, "resnet18-w16-50k-noisy": 0.1}


def gaussian_mixture(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of one 10-class mixture (its centres fixed by d), drawn with `seed`."""
    centers = np.random.default_rng(d).normal(0, 1, (10, d))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    X = centers[y] + rng.normal(0, 0.36 * math.sqrt(d), (n, d))
    return {"X": X.astype(np.float32), "y": y}


def bag_of_words(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    """TF-IDF-like rows: 50 words a row from a 10-class vocabulary of d words (each class
    its own Dirichlet word frequencies, fixed by d), log(1 + count)."""
    frequencies = np.random.default_rng(d).dirichlet(np.full(d, 0.1), 10)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    X = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        np.add.at(X[i], rng.choice(d, 50, p=frequencies[y[i]]), 1.0)
    return {"X": np.log1p(X), "y": y}


def images(
    n: int, side: int, seed: int, flip: float = 0.0, channels: int = 3
) -> dict[str, np.ndarray]:
    """Class-dependent colour and stripes plus noise: learnable, not trivially; `flip` of
    the labels replaced by another class at random."""
    base = np.random.default_rng(side).integers(40, 215, (10, 3, 1, 1))[:, :channels]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    stripes = (np.arange(side)[None, None, :, None] * (y[:, None, None, None] + 1)) % 7 < 3
    X = base[y] + 30 * stripes + rng.normal(0, 40, (n, channels, side, side))
    flipped = rng.random(n) < flip
    y = np.where(flipped, (y + rng.integers(1, 10, n)) % 10, y)
    return {"X": np.clip(X, 0, 255).astype(np.uint8), "y": y}


DEVICE = "cpu"  # --device


def run_puma(args: list[str], label: str = "") -> tuple[dict[str, Any], float, float]:
    """One CLI run in a fresh process: its JSON, wall seconds and peak resident MB."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "puma_cli", *args, "--json", "--device", DEVICE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"puma {' '.join(args)} failed: {err.decode()[-2000:]}")
    result, wall = json.loads(out), time.perf_counter() - started
    # One line per run as it ends, so a run cut short (a device's time limit) still tells
    # what finished and how long it took.
    own = f"{result['seconds']:.2f} s, " if "seconds" in result else ""
    print(f"  {label or args[0]}: {own}{wall:.1f} s wall", file=sys.stderr, flush=True)
    return result, wall, usage.ru_maxrss / 1024


def measure(name: str, epochs: int, folder: Path, rows: int | None = None) -> dict[str, Any]:
    """One case, on `rows` rows instead of its own where given (a rehearsal)."""
    kind, case_rows, size, shape, curvature = CASES[name]
    rows = rows or case_rows
    train, test = folder / f"{name}.npz", folder / f"{name}-test.npz"
    arch: list[str]
    if kind == "digits":
        train, test = ROOT / "sample_data/digits-train.npz", ROOT / "sample_data/digits-test.npz"
        arch = ["--arch", "cnn"]
    elif kind in ("mlp", "bow"):
        rows_of = gaussian_mixture if kind == "mlp" else bag_of_words
        np.savez(train, **rows_of(rows, size, 0))
        np.savez(test, **rows_of(2_000 if kind == "mlp" else 500, size, 1))
        arch = ["--arch", "mlp", "--hidden", shape]
    else:
        channels = 1 if name in GRAY else 3
        np.savez(train, **images(rows, size, 0, LABEL_NOISE.get(name, 0.0), channels))
        np.savez(test, **images(1_000, size, 1, channels=channels))
        arch = ["--arch", kind, "--arch-args", shape]
    model = folder / f"{name}.safetensors"
    trained, train_wall, _ = run_puma(
        [
            "train",
            str(train),
            "--test",
            str(test),
            "-o",
            str(model),
            "--epochs",
            str(epochs),
            "--batch-size",
            "128",
            *arch,
            "--overwrite",
        ]
    )
    marked = folder / f"{name}-ids.txt"
    run_puma(["mark", str(train), "--random", "0.01", "-o", str(marked), "--overwrite"])
    base = ["remove", "-m", str(model), "--marked", str(marked)]
    retrain, _, retrain_mb = run_puma(
        [*base, "--method", "retrain", "-o", str(folder / f"{name}-rt.safetensors"), "--overwrite"],
        "retrain",
    )
    for cache in folder.glob(f"{name}.*.safetensors"):
        cache.unlink()
    options = ["--curvature", curvature, "--overwrite"]
    try:
        cold, cold_wall, cold_mb = run_puma(
            [*base, "-o", str(folder / f"{name}-p.safetensors"), *options], "puma cold"
        )
        cached, cached_wall, _ = run_puma(
            [*base, "-o", str(folder / f"{name}-p2.safetensors"), *options], "puma cached"
        )
        matched, _, _ = run_puma(  # --forget match: the step stopped at the held-out loss
            [*base, "-o", str(folder / f"{name}-pm.safetensors"), *options, "--forget", "match"],
            "puma --forget match",
        )
        other_ids = folder / f"{name}-ids2.txt"
        run_puma(
            ["mark", str(train), "--random", "0.01", "--seed", "1", "-o", str(other_ids),
             "--overwrite"]
        )  # fmt: skip
        other, _, _ = run_puma(
            ["remove", "-m", str(model), "--marked", str(other_ids),
             "-o", str(folder / f"{name}-p3.safetensors"), *options], "puma, another marking"
        )  # fmt: skip
    except RuntimeError as exc:  # PUMA refused: no step size kept the model's performance
        return {
            "case": name,
            "rows": int(trained["n_train"]),
            "parameters": int(trained["n_parameters"]),
            "epochs": epochs,
            "retrain_seconds": retrain["seconds"],
            "test_accuracy_before": trained["test_accuracy"],
            "refused": str(exc).strip().splitlines()[-1].split("failed: ", 1)[-1],
        }
    return {
        "case": name,
        "rows": int(trained["n_train"]),
        "parameters": int(trained["n_parameters"]),
        "curvature": cold["parameters"].get("curvature"),
        "epochs": epochs,
        "train_seconds": train_wall,
        "retrain_seconds": retrain["seconds"],
        "cold_seconds": cold["seconds"],
        "cached_seconds": cached["seconds"],
        "cached_was_cached": bool(cached["cached"]),
        "other_seconds": other["seconds"],
        "other_was_cached": bool(other["cached"]),
        "other_validation_marked": int(other["skipped"]["validation"]),
        "cold_ratio": cold["seconds"] / retrain["seconds"],
        "cached_ratio": cached["seconds"] / retrain["seconds"],
        "cold_wall_seconds": cold_wall,
        "cached_wall_seconds": cached_wall,
        "peak_mb_puma": cold_mb,
        "peak_mb_retrain": retrain_mb,
        "test_accuracy_before": cold["test_accuracy_before"],
        "test_accuracy_after": cold["test_accuracy_after"],
        "test_accuracy_retrained": retrain["test_accuracy_after"],
        "marked_loss_before": cold["marked_loss_before"],
        "marked_loss_puma": cold["marked_loss_after"],
        "marked_loss_retrained": retrain["marked_loss_after"],
        "eta_scale": cold["parameters"].get("eta_scale"),
        "match_seconds": matched["seconds"],
        "match_eta_scale": matched["parameters"].get("eta_scale"),
        "marked_loss_match": matched["marked_loss_after"],
        "test_accuracy_match": matched["test_accuracy_after"],
        "held_out_loss": cold["criterion_before"],
        "damping": cold["parameters"].get("damping"),
        "warnings": cold["warnings"],
        "uncovered_parameters": cold["parameters"].get("uncovered_parameters"),
    }


def slope(rows: list[dict[str, Any]], x: str, names: list[str]) -> float | None:
    picked = [r for r in rows if r["case"] in names]
    if len(picked) < 2:
        return None
    xs = np.log([r[x] for r in picked])
    ys = np.log([r["cold_seconds"] for r in picked])
    return float(np.polyfit(xs, ys, 1)[0])


def _match_cells(r: dict[str, Any]) -> list[str]:
    """The --forget match columns (a row kept from a run before them: dashes)."""
    if "marked_loss_match" not in r:
        return ["-"] * 4
    return [f"{r['marked_loss_match']:.3g}", f"{r['match_eta_scale']:g}",
            f"{r['test_accuracy_match']:.3f}", f"{r['held_out_loss']:.3g}"]  # fmt: skip


def report(rows: list[dict[str, Any]], seconds: float, kept: int = 0) -> str:
    refused = [r for r in rows if "refused" in r]
    rows = [r for r in rows if "refused" not in r]
    lines = [
        [
            r["case"],
            f"{r['rows']:,}",
            f"{r['parameters']:,}",
            r["curvature"],
            f"{r['retrain_seconds']:.1f}",
            f"{r['cold_seconds']:.2f}",
            f"{r['cold_ratio']:.3f}",
            f"{r['cached_seconds']:.2f}",
            f"{r['cached_ratio']:.3f}",
            f"{r['other_seconds']:.2f}" + ("" if r["other_was_cached"] else " (v solved)")
            if "other_seconds" in r
            else "-",
            f"{r['peak_mb_puma']:.0f}",
            f"{r['test_accuracy_before']:.3f}",
            f"{r['test_accuracy_after']:.3f}",
            f"{r['marked_loss_before']:.3g}",
            f"{r['marked_loss_puma']:.3g}",
            f"{r['marked_loss_retrained']:.3g}",
            f"{r['eta_scale']:g}" if r.get("eta_scale") else "-",
            *_match_cells(r),
            f"{r.get('damping', float('nan')):g}",
        ]
        for r in rows
    ]
    header = [
        "case", "rows", "params", "curvature", "retrain s", "PUMA cold s", "cold / retrain",
        "cached s", "cached / retrain", "other marking s", "peak MB", "test acc before", "test acc after",
        "marked loss before", "marked loss PUMA", "marked loss retrain", "eta",
        "marked loss match", "match eta", "test acc match", "held-out loss", "damping",
    ]  # fmt: skip
    defaults = [
        r for r in rows if CASES[r["case"]][4] == "auto" and not r["case"].startswith("wide-")
    ]
    cold_max, cached_max = (0.1, 0.3) if DEVICE == "cpu" else (0.03, 2)  # issue 10's
    targets = [
        (f"cold <= {cold_max} x retrain", [r["cold_ratio"] <= cold_max for r in defaults]),
        (f"cached <= {cached_max} s", [r["cached_seconds"] <= cached_max for r in defaults]),
        ("test accuracy within 1 point",
         [r["test_accuracy_before"] - r["test_accuracy_after"] <= 0.01 + 1e-9 for r in defaults]),
    ]  # fmt: skip
    met = [f"- {name}: met in {sum(ok)} of {len(ok)} cases" for name, ok in targets]
    growth = {
        "rows, 2k parameters": slope(rows, "rows", ["mlp-2k-10k", "mlp-2k-20k", "mlp-2k-40k"]),
        "rows, 70k parameters": slope(rows, "rows", ["mlp-70k-10k", "mlp-70k-20k", "mlp-70k-40k"]),
        "parameters, 40k rows": slope(
            rows, "parameters", ["mlp-2k-40k", "mlp-70k-40k", "mlp-1m-40k"]
        ),
    }
    shown = [
        f"- cold cost against {k}: log-log slope {v:.2f}"
        for k, v in growth.items()
        if v is not None
    ] or ["- (the MLP cases measure it; none ran here)"]
    # A short recipe (a GPU lease) retrains in fewer epochs than the 20: the ratio
    # measured is an upper bound, and scaling the retrain's time by its epochs estimates
    # the ratio to a 20-epoch one (an estimate, said as such).
    short = [
        f"- {r['case']}: trained and retrained for {r['epochs']} "
        f"epoch{'s' if r['epochs'] != 1 else ''}, not 20; a retrain's "
        f"time grows with its epochs, so against a 20-epoch retrain the cold ratio would be "
        f"about {r['cold_ratio'] * r['epochs'] / 20:.3g} and the cached one "
        f"{r['cached_ratio'] * r['epochs'] / 20:.3g} (estimated, not measured)"
        for r in rows
        if r.get("epochs", 20) < 20
    ]
    return "\n".join(
        [
            f"# Removal at scale ({'CPU' if DEVICE == 'cpu' else 'GPU'})",
            "",
            f"Command: {invocation(__file__)} (its cases took {seconds / 60:.0f} min"
            + (
                f"; {kept} row{'s' if kept > 1 else ''} kept from earlier runs, each run whole"
                if kept
                else ""
            )
            + "). Times are each "
            "job's own `seconds` (reading files excluded); ratios are to `--method retrain` "
            "in the same run. 1 % of the rows marked at random; batch size 128. `eta` is "
            "the default's step (`--forget step`, a multiple of 1/N); the `match` columns are "
            "`--forget match` (the step stopped where the marked rows' loss reaches the "
            "held-out loss, run after the cached request), beside the original's held-out "
            "loss.",
            "",
            table(header, lines),
            "",
            *(f"- {r['case']}: {r['note']}" for r in rows if r.get("note")),
            *short,
            "",
            "Targets (issue 10), at the default curvature (the -exact rows, the paper's "
            "engine, are there for reference; the wide- rows, a 10,000- and a "
            "30,000-feature bag of words, are not the issue's cases and not counted):",
            *met,
            "",
            "Growth of PUMA's cold cost:",
            *shown,
            "",
            *(
                f"- **{r['case']}** ({r['parameters']:,} parameters, {r['rows']:,} rows, retrain "
                f"{r['retrain_seconds']:.0f} s): PUMA refused: {r['refused']}"
                for r in refused
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--cases",
        nargs="*",
        default=[c for c in CASES if not c.startswith(("gpu-", "wide-"))],
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the gpu- cases")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.md")
    parser.add_argument(
        "--rows",
        type=int,
        help="Each case on this many rows instead of its own: a rehearsal of a case's "
        "commands (gpu_check.sh's GPU_ROWS), not a figure to report.",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="Rerun only --cases; keep the other rows of the JSON beside --out.",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    started = time.perf_counter()
    rows = []
    if args.keep and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        rows = [r for r in previous if r["case"] not in args.cases]
    kept = len(rows)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            t0 = time.perf_counter()
            rows.append(measure(name, args.epochs, Path(tmp), args.rows))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: list(CASES).index(r["case"]))
    text = report(rows, time.perf_counter() - started, kept)
    write_results(args.out, text, rows)
    if any(math.isnan(r.get("cold_ratio", 0.0)) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
