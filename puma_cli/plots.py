"""matplotlib figures, imported lazily (matplotlib is the optional `plots` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from puma_cli.errors import PumaError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PumaError(
            "--plot needs matplotlib: pip install 'puma-cli[plots]' (or matplotlib)"
        ) from exc
    return plt


def save_found_curve(
    path: Path, fractions: np.ndarray, curves: dict[str, np.ndarray], base_rate: float
) -> None:
    """Share of flipped labels found against share of data reviewed (the paper's Figure 4)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    for name, found in curves.items():
        axes.plot(100 * fractions, 100 * found, label=name)
    axes.plot(
        100 * fractions,
        100 * np.minimum(fractions / max(base_rate, 1e-12), 1),
        "k:",
        label="perfect",
    )
    axes.plot(100 * fractions, 100 * fractions, "k--", alpha=0.4, label="random")
    axes.set_xlabel("data reviewed (%)")
    axes.set_ylabel("flipped labels found (%)")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


def save_reliability(
    path: Path, probs: list[np.ndarray], labels: np.ndarray, bins: int, titles: tuple[str, ...]
) -> None:
    """Reliability diagrams side by side (the paper's Figure 10): accuracy per confidence bin."""
    from puma_cli.quality.calibration import expected_calibration_error, reliability_bins

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(probs), figsize=(4 * len(probs), 4), sharey=True)
    for ax, p, title in zip(np.atleast_1d(axes), probs, titles, strict=True):
        rel = reliability_bins(p, labels, bins)
        width = 1.0 / bins
        filled = rel.count > 0
        ax.bar(
            rel.edges[:-1][filled],
            rel.accuracy[filled],
            width=width,
            align="edge",
            edgecolor="black",
            label="accuracy",
        )
        ax.bar(
            rel.edges[:-1][filled],
            (rel.confidence - rel.accuracy)[filled],
            bottom=rel.accuracy[filled],
            width=width,
            align="edge",
            color="red",
            alpha=0.3,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], "k--")
        ax.set_title(f"{title}: ECE {expected_calibration_error(p, labels, bins):.4f}")
        ax.set_xlabel("confidence")
        ax.legend(loc="upper left")
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


def save_roc(path: Path, fpr: np.ndarray, tpr: np.ndarray, auc: float, name: str) -> None:
    """The attack's ROC curve on log-log axes, where low-FPR behaviour shows."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 4))
    floor = 1e-4
    axes.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {auc:.3f})")
    axes.plot([floor, 1], [floor, 1], "k--", alpha=0.5, label="chance")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


def save_comparison(
    path: Path,
    methods: list[str],
    marked_loss: list[float | None],
    kl_marked: list[float | None],
    noise_floor: float,
) -> None:
    """`compare`'s figure: per method, the marked rows' loss (retraining's dashed) and the
    KL from the retrained model on them (retraining's seed-to-seed noise floor dashed)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    positions = np.arange(len(methods))
    losses = [np.nan if v is None else v for v in marked_loss]
    kls = [np.nan if v is None else v for v in kl_marked]
    left.bar(positions, losses, color="tab:blue")
    if "retrain" in methods:
        left.axhline(losses[methods.index("retrain")], color="k", ls="--", lw=1, label="retrain")
        left.legend(loc="upper left")
    left.set_ylabel("marked rows' loss")
    right.bar(positions, kls, color="tab:orange")
    right.axhline(noise_floor, color="k", ls="--", lw=1, label="retrain, seed to seed")
    right.set_ylabel("KL(retrained || method), marked rows")
    right.legend(loc="upper left")
    for axes in (left, right):
        axes.set_xticks(positions, methods, rotation=40, ha="right")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)
