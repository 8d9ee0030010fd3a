"""`debug-labels` from files: the checkpoint's training data in, a ranked CSV out."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.engine.criterion import EngineCaches, engine_and_direction
from puma_cli.engine.curvature import curvature_notes
from puma_cli.engine.derivatives import Phases
from puma_cli.engine.solvers import EXACT_MAX_PARAMETERS, flush_denormals
from puma_cli.engine.training_engine import SolverSettings
from puma_cli.errors import DataError, PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs, write_atomically
from puma_cli.io.cache import commit_all
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.io.recorded import criterion_set
from puma_cli.models.predict import predict_logits
from puma_cli.quality.label_ranking import LabelRanking, found_curve, rank_labels, suspicion_scores

FRACTIONS = np.round(np.arange(1, 101) / 100, 2)


@dataclass(frozen=True)
class DebugReport:
    suspects: list[str]
    seconds: float
    score: str
    n: int
    output: Path | None
    plot: Path | None
    cached: bool
    truth: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@flush_denormals()
def debug_labels(
    model: Path,
    *,
    k: int = 50,
    output: Path | None = None,
    score: str = "puma",
    truth: Path | None = None,
    plot: Path | None = None,
    confidence_filter: bool = True,
    settings: SolverSettings | None = None,
    criterion_data: Path | None = None,
    use_cache: bool = True,
    agreeing_criterion: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    phases: Phases | None = None,
) -> DebugReport:
    """Rank the rows the model is trained on by suspicion; write the top k (all if k = 0)."""
    if k < 0:
        raise PumaError(f"-k {k}: give 0 (every row) or a positive count")
    if plot is not None and truth is None:
        raise PumaError("--plot draws the found-vs-reviewed curve, which needs --truth IDS")
    settings = settings or SolverSettings()
    settings.validate()
    check_outputs([output, plot], [model, truth, criterion_data], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    recorded.protect_recorded([output, plot], checkpoint)
    dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
    rows = np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED)
    criterion = criterion_set(checkpoint, dataset, checkpoint.roles, criterion_data, phases)
    leaks = (
        recorded.trained_on_warning(checkpoint, dataset, criterion, "--criterion-data")
        if criterion_data is not None
        else []
    )
    if agreeing_criterion:
        criterion = _agreeing(checkpoint, criterion)
    started = time.perf_counter()
    settings, switched = _self_influence_settings(settings, score, checkpoint.model)
    caches = EngineCaches.beside(model, use_cache)
    engine, direction = engine_and_direction(
        checkpoint, dataset, rows, criterion, settings, caches, phases
    )
    scores = suspicion_scores(engine, direction, score, caches.direction)
    probs = torch.softmax(predict_logits(checkpoint.model, dataset.X[rows]).double(), 1).numpy()
    labels = dataset.y[rows]
    ranking = rank_labels(scores, probs, labels, k or rows.size, confidence_filter)
    seconds = time.perf_counter() - started
    top = ranking.order[: k or rows.size]
    ids = dataset.ids[rows]
    figures: dict[str, float] = {}
    curve = None
    if truth is not None:
        flipped = np.zeros(rows.size, dtype=bool)
        wanted = read_ids(truth)
        if not wanted:
            raise DataError(f"{truth} names no ids; give the ids whose labels are known wrong")
        positions = rows_for_ids(dataset, wanted, truth)
        flipped[np.isin(rows, positions)] = True
        curve = found_curve(ranking.order, flipped, FRACTIONS)
        found = int(flipped[top].sum())
        figures = {
            "known": int(flipped.sum()),
            "precision_at_k": found / max(top.size, 1),
            "recall_at_k": found / max(int(flipped.sum()), 1),
            "found_at_10pct": float(curve[9]),
            "found_at_20pct": float(curve[19]),
        }
    writers = {}
    if output is not None:
        writers[output] = lambda tmp: _write_csv(
            tmp, top, ids, labels, ranking, checkpoint.class_names
        )
    if plot is not None and curve is not None:
        from puma_cli.plots import save_found_curve

        base_rate = figures["known"] / rows.size
        writers[plot] = lambda tmp: save_found_curve(tmp, FRACTIONS, {score: curve}, base_rate)
    write_atomically(writers, overwrite)
    notes = leaks + switched + curvature_notes(engine) + commit_all(caches.all())
    return DebugReport(
        suspects=ids[top].tolist(),
        seconds=seconds,
        score=score,
        n=int(rows.size),
        output=output,
        plot=plot,
        cached=direction.cached,
        truth=figures,
        warnings=notes,
    )


def _self_influence_settings(
    settings: SolverSettings, score: str, model: torch.nn.Module
) -> tuple[SolverSettings, list[str]]:
    """`auto` under self-influence: K-FAC past the dense matrix's EXACT_MAX_PARAMETERS,
    where `auto` alone may take the exact Hessian (a small training set), which
    self-influence would have to build whole; with the note that says so."""
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if (
        score != "self-influence"
        or settings.curvature != "auto"
        or n_parameters <= EXACT_MAX_PARAMETERS
    ):
        return settings, []
    note = (
        f"--curvature auto: self-influence past the dense matrix's {EXACT_MAX_PARAMETERS:,} "
        "parameters takes K-FAC's blocks (--curvature ekfac fits them closer)"
    )
    return replace(settings, curvature="kfac"), [note]


def _agreeing(checkpoint: ckpt.Checkpoint, criterion: Dataset) -> Dataset:
    """The criterion rows whose label the model predicts.

    The criterion data carry the same label noise as the training data when they come
    from the same file; a mislabelled criterion point pulls grad C toward its wrong
    label, the same way as the mislabelled training points, and hides them (measured:
    5 % of 10 % planted flips found in the first 10 % reviewed on one moons seed, against
    93 % with a clean criterion). Keeping the points the model agrees with drops them.
    """
    logits = predict_logits(checkpoint.model, criterion.X)
    rows = np.flatnonzero(logits.argmax(1).numpy() == criterion.y)
    if rows.size == 0:
        raise PumaError("the model predicts none of the criterion labels; check the data")
    return criterion.subset(rows)


def _write_csv(
    path: Path,
    top: np.ndarray,
    ids: np.ndarray,
    labels: np.ndarray,
    ranking: LabelRanking,
    class_names: tuple[str, ...] | None,
) -> None:
    def name(value: int) -> str:
        return class_names[value] if class_names else str(int(value))

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "label", "predicted", "confidence", "influence", "rank"])
        for rank, i in enumerate(top, start=1):
            writer.writerow(
                [
                    ids[i],
                    name(labels[i]),
                    name(ranking.predicted[i]),
                    f"{ranking.confidence[i]:.6f}",
                    f"{ranking.score[i]:.6g}",
                    rank,
                ]
            )
