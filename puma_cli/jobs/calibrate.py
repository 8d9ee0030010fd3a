"""`calibrate` from files: Algorithm 3's categories, then a PUMA patch that lowers ECE.

C_ece is a differentiable surrogate of ECE on the held-out data (quality.calibration.soft_ece).
psi_ece = v_ece . g_i ranks the training rows by how much their removal would lower it;
Algorithm 3 splits the k lowest into over-confident, over-uncertain and other-noise.
The patch removes over-confident and other-noise rows and upweights over-uncertain ones,
with weights chosen on the cross-entropy criterion so that held-out loss, and with it
accuracy, stays put to first order while ECE falls. The step size is the one among a few
that gives the lowest binned ECE on the held-out data without costing accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.engine.criterion import (
    CriterionDirection,
    EngineCaches,
    engine_and_direction,
    scores,
)
from puma_cli.engine.curvature import curvature_notes
from puma_cli.engine.derivatives import InfluenceModel, Phases
from puma_cli.engine.solvers import flush_denormals, solve
from puma_cli.engine.training_engine import SolverSettings
from puma_cli.errors import PumaError, require_range
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import Writer, check_outputs, write_atomically
from puma_cli.io.cache import commit_all
from puma_cli.io.recorded import criterion_set
from puma_cli.models.architectures import Classifier
from puma_cli.models.predict import as_tensor, predict_logits
from puma_cli.quality.calibration import (
    MAX_BINS,
    calibration_categories,
    expected_calibration_error,
    soft_ece,
)
from puma_cli.unlearn.puma import reweight

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class CalibrateReport:
    output: Path
    ece_before: float
    ece_after: float
    accuracy_before: float
    accuracy_after: float
    test_ece_before: float | None
    test_ece_after: float | None
    test_accuracy_before: float | None
    test_accuracy_after: float | None
    over_confident: int
    over_uncertain: int
    other_noise: int
    eta_scale: float
    predicted_ece_change: float
    seconds: float
    plot: Path | None
    warnings: list[str] = field(default_factory=list)


def default_calibrated_path(model: Path) -> Path:
    return model.with_name(f"{model.stem}.calibrated.safetensors")


def _figures(model: torch.nn.Module, data: Dataset, bins: int) -> tuple[float, float]:
    probs = torch.softmax(predict_logits(model, data.X).double(), 1).numpy()
    ece = expected_calibration_error(probs, data.y, bins)
    return ece, float((probs.argmax(1) == data.y).mean())


@flush_denormals()
def calibrate(
    model: Path,
    output: Path | None = None,
    *,
    bins: int = 15,
    k: int | None = None,
    max_accuracy_drop: float = 0.5,
    lambda_cap: float = 1.0,
    plot: Path | None = None,
    settings: SolverSettings | None = None,
    criterion_data: Path | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    phases: Phases | None = None,
) -> CalibrateReport:
    """Patch `model` toward a lower held-out ECE; refuse if accuracy would fall too far."""
    require_range("--bins", bins, 1, MAX_BINS)
    require_range("--max-accuracy-drop", max_accuracy_drop, 0, 100)
    require_range("--lambda-cap", lambda_cap, 0, low_open=True)
    settings = settings or SolverSettings()
    settings.validate()
    output = output or default_calibrated_path(model)
    check_outputs([output, plot], [model, criterion_data], overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    recorded.protect_recorded([output, plot], checkpoint)
    dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
    criterion = criterion_set(checkpoint, dataset, checkpoint.roles, criterion_data, phases)
    test = recorded.load_recorded_or_none(checkpoint, "test", phases)
    started = time.perf_counter()
    rows = np.flatnonzero(checkpoint.roles == ckpt.ROLE_TRAINED)
    caches = EngineCaches.beside(model)
    engine, ce = engine_and_direction(
        checkpoint, dataset, rows, criterion, settings, caches, phases
    )
    k = k if k is not None else max(1, rows.size // 10)
    if not 0 < k <= rows.size:
        raise PumaError(f"-k {k}: give a count between 1 and {rows.size}")
    direction = _direction(
        engine,
        ce,
        caches,
        checkpoint,
        dataset,
        rows,
        criterion,
        bins,
        k,
        lambda_cap,
        settings.solver,
    )
    scale, before, after, patched = _best_step(
        engine, direction.step, rows.size, checkpoint.model, criterion, bins, max_accuracy_drop
    )
    patched = patched.to(next(checkpoint.model.parameters()).device).eval()
    if not all(torch.isfinite(p).all() for p in patched.parameters()):
        raise PumaError("the patch holds NaN or inf; raise --damping (nothing was written)")
    test_before, test_after = _on_test(checkpoint.model, patched, test, bins, max_accuracy_drop)
    seconds = time.perf_counter() - started
    report = CalibrateReport(
        output=output,
        ece_before=before[0],
        ece_after=after[0],
        accuracy_before=before[1],
        accuracy_after=after[1],
        test_ece_before=test_before[0] if test_before else None,
        test_ece_after=test_after[0] if test_after else None,
        test_accuracy_before=test_before[1] if test_before else None,
        test_accuracy_after=test_after[1] if test_after else None,
        over_confident=int(direction.over_confident),
        over_uncertain=int(direction.over_uncertain),
        other_noise=int(direction.noise),
        eta_scale=scale,
        predicted_ece_change=float(direction.grad_ece.dot(direction.step)) * scale / rows.size,
        seconds=seconds,
        plot=plot,
    )
    entry = _provenance_entry(report, bins=bins, k=k, lambda_cap=lambda_cap, damping=ce.damping)
    new = replace(checkpoint, model=patched, provenance=[*checkpoint.provenance, entry])
    writers: dict[Path, Writer] = {output: partial(ckpt.write_checkpoint, new)}
    if plot is not None:
        shown = test if test is not None else criterion
        writers[plot] = lambda tmp: _plot(tmp, checkpoint.model, patched, shown, bins)
    write_atomically(writers, overwrite)
    if criterion_data is not None:
        report.warnings.extend(
            recorded.trained_on_warning(checkpoint, dataset, criterion, "--criterion-data")
        )
    report.warnings.extend(curvature_notes(engine))
    report.warnings.extend(commit_all(caches.all()))
    return report


@dataclass(frozen=True)
class _Direction:
    """The patch before its length: step (P,) = H^-1 of the rows' weighted gradients, the
    ECE surrogate's gradient, and Algorithm 3's category sizes."""

    step: torch.Tensor
    grad_ece: torch.Tensor
    over_confident: int
    over_uncertain: int
    noise: int


def _direction(
    engine: InfluenceModel,
    ce: CriterionDirection,
    caches: EngineCaches,
    checkpoint: ckpt.Checkpoint,
    dataset: Dataset,
    rows: np.ndarray,
    criterion: Dataset,
    bins: int,
    k: int,
    lambda_cap: float,
    solver: str,
) -> _Direction:
    """Rank the trained rows by psi_ece, split the k lowest into Algorithm 3's categories,
    and solve for the patch that removes the over-confident and other-noise rows and
    upweights the over-uncertain ones (weights chosen on the cross-entropy criterion)."""
    Xc = as_tensor(criterion.X, torch.float64, engine.device)
    yc = torch.as_tensor(criterion.y, dtype=torch.long, device=engine.device)
    grad_ece = engine.gradient_on(Xc, yc, lambda logits, y: soft_ece(logits, y, bins))
    v_ece = solve(engine, grad_ece, solver, ce.damping, ce.lambda_max).x
    psi_ece = engine.directional_derivatives(v_ece).cpu().numpy()
    psi_ce = scores(engine, ce, None, caches.direction)
    probs = torch.softmax(predict_logits(checkpoint.model, dataset.X[rows]).double(), 1).numpy()
    own = probs[np.arange(rows.size), dataset.y[rows]]
    over_confident, over_uncertain, noise = calibration_categories(psi_ece, own, k)
    marked = np.concatenate([over_confident, noise]).astype(np.int64)
    if marked.size == 0:
        raise PumaError(
            "no training point is both harmful to calibration and not over-uncertain; "
            "nothing to patch (nothing was written)"
        )
    weights = np.zeros(rows.size)
    weights[marked] = 1.0
    if over_uncertain.size:
        lam, _ = reweight(psi_ce[over_uncertain], float(psi_ce[marked].sum()), lambda_cap)
        weights[over_uncertain] = -lam
    step = solve(
        engine,
        engine.weighted_gradient(torch.as_tensor(weights, device=engine.device)),
        solver,
        ce.damping,
        ce.lambda_max,
    ).x
    return _Direction(step, grad_ece, over_confident.size, over_uncertain.size, noise.size)


def _best_step(
    engine: InfluenceModel,
    step: torch.Tensor,
    n: int,
    model: torch.nn.Module,
    criterion: Dataset,
    bins: int,
    max_accuracy_drop: float,
) -> tuple[float, tuple[float, float], tuple[float, float], Classifier]:
    """Of the steps (scale / n) x `step`, scale in SCALES, the one with the lowest held-out
    ECE among those that cost at most max_accuracy_drop points of held-out accuracy:
    (scale, (ECE, accuracy) before, the same after, the patched model); refused where
    none lowers ECE."""
    ece_before, accuracy_before = _figures(model, criterion, bins)
    best: tuple[float, float, float, Classifier] | None = None
    for scale in SCALES:
        candidate = engine.patched_module((scale / n) * step)
        assert isinstance(candidate, Classifier)
        ece, accuracy = _figures(candidate.eval(), criterion, bins)
        if accuracy_before - accuracy > max_accuracy_drop / 100 + 1e-12:
            continue
        if best is None or ece < best[1]:
            best = (scale, ece, accuracy, candidate)
    if best is None or best[1] >= ece_before:
        raise PumaError(
            f"no step lowers held-out ECE ({ece_before:.4f}) without costing more than "
            f"{max_accuracy_drop:g} accuracy points; nothing was written"
        )
    scale, ece_after, accuracy_after, patched = best
    return scale, (ece_before, accuracy_before), (ece_after, accuracy_after), patched


def _on_test(
    model: torch.nn.Module,
    patched: torch.nn.Module,
    test: Dataset | None,
    bins: int,
    max_accuracy_drop: float,
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(ECE, accuracy) on the test split before and after; refused where the patch costs
    more test accuracy than max_accuracy_drop points. (None, None) without a test split."""
    if test is None:
        return None, None
    before, after = _figures(model, test, bins), _figures(patched, test, bins)
    if before[1] - after[1] > max_accuracy_drop / 100 + 1e-12:
        raise PumaError(
            f"the patch lowers test accuracy by {100 * (before[1] - after[1]):.2f} "
            f"points, more than --max-accuracy-drop {max_accuracy_drop:g}; nothing was written"
        )
    return before, after


_RECORDED = (
    "ece_before",
    "ece_after",
    "accuracy_before",
    "accuracy_after",
    "test_ece_before",
    "test_ece_after",
    "test_accuracy_before",
    "test_accuracy_after",
    "over_confident",
    "over_uncertain",
    "other_noise",
)


def _provenance_entry(
    report: CalibrateReport, *, bins: int, k: int, lambda_cap: float, damping: float
) -> dict[str, object]:
    return {
        "op": "calibrate",
        "method": "puma",
        "parameters": {
            "bins": bins,
            "k": k,
            "eta_scale": report.eta_scale,
            "lambda_cap": lambda_cap,
            "surrogate": "soft-binned ECE",
            "damping": damping,
        },
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 4),
        "metrics": {key: getattr(report, key) for key in _RECORDED},
    }


def _plot(
    path: Path, before: torch.nn.Module, after: torch.nn.Module, data: Dataset, bins: int
) -> None:
    from puma_cli.plots import save_reliability

    probs = [torch.softmax(predict_logits(m, data.X).double(), 1).numpy() for m in (before, after)]
    save_reliability(path, probs, data.y, bins, ("before", "after"))
