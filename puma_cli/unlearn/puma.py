"""PUMA (Algorithm 1) and plain influence removal.

With N rows trained on, J their mean loss, H = hess J + mu I, C the loss on held-out
data and v = H^-1 grad C (solved once, cached beside the checkpoint):

  psi_i  = v . g_i                      one batched JVP for every row (Eq. 9)
  lambda = argmin |sum_U lambda_j psi_j - sum_M psi_k|, 0 <= lambda <= cap, least norm (Eq. 10)
  theta' = theta + eta H^-1 (sum_M g_k - sum_U lambda_j g_j)     one solve, by linearity (Eq. 11)

eta is given as a multiple s of 1/N: s = 1 is first-order exact removal (the influence
of deleting a point from a mean loss is H^-1 g / N). `influence` is the same patch with
lambda = 0: it removes the marked points and lets the criterion drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from puma_cli.engine.criterion import (
    CriterionDirection,
    criterion_direction,
    psi_weighted_sum,
    scores,
)
from puma_cli.engine.curvature import curvature_notes, describe
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.solvers import Solve, flush_denormals, solve
from puma_cli.engine.training_engine import training_engine
from puma_cli.errors import PumaError
from puma_cli.io.cache import Cache
from puma_cli.models.architectures import Classifier
from puma_cli.models.predict import as_tensor
from puma_cli.models.recipe import mixing_notes
from puma_cli.unlearn import RemovalRequest, RemovalResult, register
from puma_cli.unlearn.finetuning import finetune
from puma_cli.unlearn.step_length import NoSafeStep, choose_scale, unmarked_sample

DAMPING_RAISE = 100.0
MAX_DAMPING = 1e6  # x lambda_max: past it the step is a plain gradient step, only shorter
INTERPOLATED_LOSS = 1e-4
UNCONVERGED = 1e-2  # a solve's relative residual past which the report says it did not converge


@register("puma")
def puma(request: RemovalRequest) -> RemovalResult:
    return _patch(request, reweight_others=True)


@register("influence")
def influence(request: RemovalRequest) -> RemovalResult:
    return _patch(request, reweight_others=False)


def reweight(psi: np.ndarray, target: float, cap: float) -> tuple[np.ndarray, float]:
    """The least-norm lambda in [0, cap]^n with psi . lambda = target, or the closest reachable.

    The objective is rank one, so its exact solutions are many; among them the least-norm
    one is lambda_j = clip(t psi_j, 0, cap) for one scalar t (`reweight_scale`). Weights
    stay non-negative (a negative weight would silently remove other data) and spread in
    proportion to each point's score. Returns (lambda, residual psi . lambda - target).
    """
    return reweighted(psi, reweight_scale(psi, target, cap), target, cap)


def reweighted(psi: np.ndarray, t: float, target: float, cap: float) -> tuple[np.ndarray, float]:
    """lambda = clip(t psi, 0, cap) and its residual psi . lambda - target."""
    lam = np.clip(t * psi, 0.0, cap)
    return lam, float(psi @ lam - target)


def reweight_scale(psi: np.ndarray, target: float, cap: float) -> float:
    """t of the least-norm lambda = clip(t psi, 0, cap), found by bisection (0: no weight,
    when the target is 0 or no score has its sign)."""
    if target == 0 or not np.any(psi * np.sign(target) > 0):
        return 0.0

    def reached(t: float) -> float:
        return float(psi @ np.clip(t * psi, 0.0, cap))

    # t has the sign of target; reached(t) moves monotonically toward target with |t|.
    sign = np.sign(target)
    hi = 1.0
    while abs(reached(sign * hi)) < abs(target) and hi < 1e30:
        if np.all(np.clip(sign * hi * psi, 0.0, cap)[psi * sign > 0] >= cap):
            break
        hi *= 2.0
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if abs(reached(sign * mid)) < abs(target):
            lo = mid
        else:
            hi = mid
    return float(sign * hi)


@flush_denormals()
def _patch(request: RemovalRequest, reweight_others: bool) -> RemovalResult:
    options = request.options
    trained = request.trained_rows
    marked_in_trained = np.isin(trained, request.marked)
    engine = training_engine(
        request.checkpoint,
        request.dataset,
        trained,
        options.precision,
        settings=options.solver_settings(),
        factor_cache=options.factor_cache,
        phases=request.phases,
    )
    n = engine.n
    rows = _scored_rows(marked_in_trained, reweight_others, options.upweight_sample, options.seed)
    marked_at = marked_in_trained[rows]  # the marked among the scored rows
    mask = torch.as_tensor(marked_in_trained, device=engine.device)
    found = _guarded_step(request, engine, rows, marked_in_trained, reweight_others)
    spectrum, step, scale = found.spectrum, found.step, found.scale
    unit_change = float(spectrum.grad_c.dot(step.x))  # dC per unit of eta, to first order
    with torch.no_grad():
        marked_losses = engine.losses(engine.theta, engine.X[mask], engine.y[mask])
    delta = (scale / n) * step.x
    if not torch.isfinite(delta).all():
        raise PumaError("the patch holds NaN or inf; raise --damping (nothing was written)")
    model = _as_classifier(engine.patched_module(delta))
    repair: dict[str, object] = {}
    if options.forget == "repair":  # a short fine-tune of the patched model on what remains
        patched = replace(request, checkpoint=replace(request.checkpoint, model=model))
        tuned = finetune(patched)
        model = _as_classifier(tuned.model)
        repair = {"repair_epochs": tuned.parameters["epochs"], "repair_lr": tuned.parameters["lr"]}
    interpolated = int((marked_losses < INTERPOLATED_LOSS).sum())
    warnings = found.notes
    warnings.extend(curvature_notes(engine))
    warnings.extend(mixing_notes(request.checkpoint.recipe))
    warnings.extend(_step_warnings(step, interpolated, int(marked_in_trained.sum())))
    return RemovalResult(
        model=model,
        method="puma" if reweight_others else "influence",
        parameters={
            "eta_scale": scale,
            "eta": scale / n,
            "solver": options.solver,
            **describe(engine),
            "precision": str(engine.dtype).removeprefix("torch."),
            "damping": step.damping,
            "lambda_max": spectrum.lambda_max,
            "solver_iterations": step.iterations,
            "solver_residual": step.residual,
            "lambda_cap": options.lambda_cap if reweight_others else None,
            "upweight_candidates": int((~marked_at).sum()) if reweight_others else None,
            "upweighted": found.upweighted,
            "reweight_residual": found.residual if reweight_others else None,
            "interpolated_marked": interpolated,
            "forget": options.forget,
            **repair,
        },
        eta=scale / n,
        predicted_criterion_change=(scale / n) * unit_change,
        warnings=warnings,
        cached=spectrum.cached,
    )


@dataclass
class _Found:
    """The patch the guard let through: v's solve at the damping used, the patch's solve,
    its eta scale, the reweighting's residual and upweighted count, and the notes."""

    spectrum: CriterionDirection
    step: Solve
    scale: float
    residual: float
    upweighted: int
    notes: list[str]


def _guarded_step(
    request: RemovalRequest,
    engine: InfluenceModel,
    rows: np.ndarray,
    marked_in_trained: np.ndarray,
    reweight_others: bool,
) -> _Found:
    """Solve for the patch and choose its length; where no length keeps the model's
    performance, raise the damping (Levenberg-Marquardt) and solve again."""
    options = request.options
    settings = options.solver_settings()
    Xc = as_tensor(request.criterion.X, torch.float64, engine.device)
    yc = torch.as_tensor(request.criterion.y, dtype=torch.long, device=engine.device)
    marked_at = marked_in_trained[rows]
    notes: list[str] = []
    at_least, spectrum = 0.0, None
    while True:  # Levenberg-Marquardt: more damping while no step keeps the performance
        spectrum = criterion_direction(
            engine, request.checkpoint, request.criterion, settings, options.cache, at_least,
            spectrum,
        )  # fmt: skip
        top = spectrum.lambda_max
        weights = marked_at.astype(float)
        residual, upweighted, t = 0.0, 0, 0.0
        psi = np.zeros(len(rows))
        if reweight_others:  # influence needs no scores: it lets the criterion drift
            psi = scores(engine, spectrum, rows, options.cache)
            target = float(psi[marked_at].sum())
            t = reweight_scale(psi[~marked_at], target, options.lambda_cap)
            lam, residual = reweighted(psi[~marked_at], t, target, options.lambda_cap)
            weights[~marked_at] = -lam
            upweighted = int((lam > 0).sum())
        direction = _patch_gradient(
            engine, spectrum, rows, weights, np.where(marked_at, 0.0, psi), t, options.cache
        )
        step = solve(engine, direction, options.solver, spectrum.damping, top)
        if not torch.isfinite(step.x).all():
            raise PumaError("the patch holds NaN or inf; raise --damping (nothing was written)")
        try:
            scale = choose_scale(
                request, engine, spectrum, step.x, marked_in_trained, Xc.float(), yc, notes
            )
            return _Found(spectrum, step, scale, residual, upweighted, notes)
        except NoSafeStep as refused:
            raised = min(step.damping * DAMPING_RAISE, MAX_DAMPING)
            if step.damping >= MAX_DAMPING:
                raise PumaError(
                    f"no step keeps the model's performance: down to eta {refused.scale:g}/N, "
                    f"with the damping raised up to {step.damping:g} x lambda_max, the remaining "
                    "rows' accuracy (their loss under --forget none) or the held-out loss or "
                    "accuracy fell past the guard, so nothing was written; give --eta S to "
                    "force a step, or use --method retrain"
                ) from None
            notes.append(
                f"every step at damping {step.damping:g} x lambda_max broke the model (down to "
                f"eta {refused.scale:g}/N): the damping was raised to {raised:g}, which makes "
                "the patch closer to a plain gradient step"
            )
            at_least = raised


def _step_warnings(step: Solve, interpolated: int, marked: int) -> list[str]:
    """What the patch's solve and the marked rows' fit say about the removal's quality."""
    warnings = []
    if step.residual > UNCONVERGED:  # CG ran out of iterations (an asymmetric product, say)
        warnings.append(
            f"the patch's solve stopped after {step.iterations} iterations at a relative "
            f"residual of {step.residual:.2g}, far from converged: the patch is only roughly "
            "the inverse-curvature step; raise --damping, or use --curvature kfac"
        )
    if interpolated:
        warnings.append(
            f"{interpolated} of {marked} marked points are fit to a loss "
            f"below {INTERPOLATED_LOSS:g}: their gradients are ~0, so first-order removal "
            "barely moves the model on them and a retrained model may still differ there; "
            "use --method retrain where that matters"
        )
    return warnings


def _patch_gradient(
    engine: InfluenceModel,
    spectrum: CriterionDirection,
    rows: np.ndarray,
    weights: np.ndarray,
    psi: np.ndarray,
    t: float,
    cache: Cache | None,
) -> torch.Tensor:
    """sum_i w_i g_i over the scored `rows` (w: 1 marked, -lambda_j upweighted; `psi` the
    candidates' scores, 0 at the marked).

    With lambda_j = clip(t psi_j, 0, cap), the upweighted rows' share is t S, S the sum of
    psi_j g_j over the rows on t's side (`psi_weighted_sum`, kept beside v), less the rows
    where the two differ: rows S holds whose weight is not t psi_j now (marked since,
    clipped at the cap, candidates no more) and candidates S lacks. So a request after the
    first pays a backward pass over those and the marked rows, not over every upweighted
    one (the noisy ResNet-18: ~45 rows, not ~2,300); the same in exact arithmetic."""
    weighted = np.flatnonzero(weights)
    if t != 0:
        total, summed = psi_weighted_sum(engine, spectrum, t, rows, psi, cache)
        every = np.union1d(rows, summed)
        w = np.zeros(len(every))
        w[np.searchsorted(every, rows)] = weights
        w[np.searchsorted(every, summed)] += t * scores(engine, spectrum, summed, cache)
        fix = np.flatnonzero(w)
        if len(fix) < len(weighted):  # else the plain sum is the cheaper (a new --seed)
            return engine.gradient_at(every[fix], w[fix]) - t * total
    return engine.gradient_at(rows[weighted], weights[weighted])


def _scored_rows(marked: np.ndarray, reweight_others: bool, sample: int, seed: int) -> np.ndarray:
    """The positions whose scores the patch needs: the marked rows, and for PUMA the
    remaining rows it may upweight (`sample` of them at random, seeded; 0: all)."""
    if not reweight_others:
        return np.flatnonzero(marked)
    candidates = unmarked_sample(marked, sample, seed)
    return np.sort(np.concatenate([np.flatnonzero(marked), candidates]))


def _as_classifier(module: torch.nn.Module) -> Classifier:
    """The patched copy (on the engine's device, the model's)."""
    assert isinstance(module, Classifier)
    return module.eval()
