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

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.engine.criterion import (
    CriterionDirection,
    criterion_direction,
    per_row,
    psi_weighted_sum,
    scores,
    training_engine,
)
from puma_cli.engine.curvature import curvature_notes, describe
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.solvers import flush_denormals, solve
from puma_cli.errors import PumaError
from puma_cli.io.cache import Cache
from puma_cli.models.architectures import Classifier
from puma_cli.models.predict import as_tensor
from puma_cli.models.training import mixing_notes
from puma_cli.unlearn import RemovalRequest, RemovalResult, register
from puma_cli.unlearn.finetuning import finetune

AUTO_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SMALLEST_SCALE = 1 / 64  # the guard's smallest step, before it raises the damping
DAMPING_RAISE = 100.0
MAX_DAMPING = 1e6  # x lambda_max: past it the step is a plain gradient step, only shorter
FORGET_SCALES = tuple(2.0**k for k in range(13))  # --forget step: up to 4096 / N
GUARD_ROWS = 8192  # remaining rows the `auto` guard checks the training loss on
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


def _criterion_figures(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int
) -> tuple[float, float]:
    """The mean cross-entropy and the accuracy over the rows."""
    loss, accuracy = _row_figures(model, X, y, chunk).mean(axis=0)
    return float(loss), float(accuracy)


def _row_figures(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int
) -> np.ndarray:
    """(n, 2) float64: each row's cross-entropy and whether the model predicts its label."""
    with torch.no_grad():
        logits = torch.cat([model(X[i : i + chunk]).double() for i in range(0, len(X), chunk)])
    losses = F.cross_entropy(logits, y, reduction="none")
    return torch.stack([losses, (logits.argmax(1) == y).double()], dim=1).cpu().numpy()


@flush_denormals()
def _patch(request: RemovalRequest, reweight_others: bool) -> RemovalResult:
    options = request.options
    trained = request.trained_rows
    marked_in_trained = np.isin(trained, request.marked)
    settings = options.solver_settings()
    engine = training_engine(
        request.checkpoint,
        request.dataset,
        trained,
        options.precision,
        settings=settings,
        factor_cache=options.factor_cache,
        phases=request.phases,
    )
    n = engine.n
    Xc = as_tensor(request.criterion.X, torch.float64, engine.device)
    yc = torch.as_tensor(request.criterion.y, dtype=torch.long, device=engine.device)
    rows = _scored_rows(marked_in_trained, reweight_others, options.upweight_sample, options.seed)
    marked_at = marked_in_trained[rows]  # the marked among the scored rows
    mask = torch.as_tensor(marked_in_trained, device=engine.device)
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
            scale = _choose_scale(
                request, engine, spectrum, step.x, marked_in_trained, Xc.float(), yc, notes
            )
            break
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
    warnings = notes
    warnings.extend(curvature_notes(engine))
    warnings.extend(mixing_notes(request.checkpoint.recipe))
    if step.residual > UNCONVERGED:  # CG ran out of iterations (an asymmetric product, say)
        warnings.append(
            f"the patch's solve stopped after {step.iterations} iterations at a relative "
            f"residual of {step.residual:.2g}, far from converged: the patch is only roughly "
            "the inverse-curvature step; raise --damping, or use --curvature kfac"
        )
    interpolated = int((marked_losses < INTERPOLATED_LOSS).sum())
    if interpolated:
        warnings.append(
            f"{interpolated} of {int(marked_in_trained.sum())} marked points are fit to a loss "
            f"below {INTERPOLATED_LOSS:g}: their gradients are ~0, so first-order removal "
            "barely moves the model on them and a retrained model may still differ there; "
            "use --method retrain where that matters"
        )
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
            "lambda_max": top,
            "solver_iterations": step.iterations,
            "solver_residual": step.residual,
            "lambda_cap": options.lambda_cap if reweight_others else None,
            "upweight_candidates": int((~marked_at).sum()) if reweight_others else None,
            "upweighted": upweighted,
            "reweight_residual": residual if reweight_others else None,
            "interpolated_marked": interpolated,
            "forget": options.forget,
            **repair,
        },
        eta=scale / n,
        predicted_criterion_change=(scale / n) * unit_change,
        warnings=warnings,
        cached=spectrum.cached,
    )


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
    candidates = _unmarked_sample(marked, sample, seed)
    return np.sort(np.concatenate([np.flatnonzero(marked), candidates]))


def _unmarked_sample(marked: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` unmarked positions at random (seeded; 0 or more than there are: all), sorted:
    the first unmarked ones of one seeded order of every row, so that two requests that
    mark different points draw nearly the same rows, and the second finds their scores in
    the cache."""
    if not 0 < size < int((~marked).sum()):
        return np.flatnonzero(~marked)
    order = np.random.default_rng(seed).permutation(marked.size)
    return np.sort(order[~marked[order]][:size])


@dataclass(frozen=True)
class _Limits:
    """What the guard asks of a model on some rows: a mean cross-entropy of at most
    `loss` and an accuracy at most `drop` below `accuracy0` (None: not asked)."""

    loss: float | None
    accuracy0: float | None
    drop: float

    def held_loss(
        self,
        model: torch.nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        chunk: int,
        done: Callable[[int], None] = lambda k: None,
    ) -> float | None:
        """The rows' mean cross-entropy where the limits hold, else None: the decision
        `_criterion_figures` over all the rows would give, taken chunk by chunk (`done(k)`
        after the k-th) and stopped at the first chunk after which it can only fail: losses
        are non-negative, and the rows still to come can at most all be predicted right. A
        broken step (most of those the search tries past the one it keeps) costs a few
        chunks, not a pass."""
        n = int(y.shape[0])
        parts, total, correct = [], 0.0, 0
        for k, start in enumerate(range(0, n, chunk), 1):
            figures = _row_figures(model, X[start : start + chunk], y[start : start + chunk], chunk)
            done(k)
            parts.append(figures)
            total += float(figures[:, 0].sum())
            correct += int(figures[:, 1].sum())
            rest = n - start - len(figures)
            if self.loss is not None and total / n > self.loss * (1 + 1e-9) + 1e-12:
                return None
            if self.accuracy0 is not None and self.accuracy0 - (correct + rest) / n > self.drop:
                return None
        loss, accuracy = np.concatenate(parts).mean(axis=0) if parts else (0.0, 0.0)
        if self.loss is not None and loss > self.loss:
            return None
        if self.accuracy0 is not None and self.accuracy0 - accuracy > self.drop:
            return None
        return float(loss)


class NoSafeStep(Exception):
    """Every step size the guard tried broke the model (down to `scale` / N)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


def _choose_scale(
    request: RemovalRequest,
    engine: InfluenceModel,
    spectrum: CriterionDirection,
    x: torch.Tensor,
    marked: np.ndarray,
    Xc: torch.Tensor,
    yc: torch.Tensor,
    notes: list[str],
) -> float:
    """The eta scale: as given, or a guarded line search (forward passes only).

    Damping shrinks the step along flat directions, and first-order removal understates
    what leaving a cluster out does, so s = 1 removes too little. `auto` doubles s from 1
    while (a) the remaining points stay learned: their accuracy (on up to GUARD_ROWS of
    them, seeded) drops by at most `max_accuracy_drop` points, or under --forget none
    their training loss rises by at most `fit_tolerance` (relative); (b) held-out
    accuracy drops by at most `max_accuracy_drop` points; (c) held-out loss rises by at
    most `fit_tolerance`.
    It takes the last s that passed; if s = 1 fails, the largest power of two below it
    that passes (`_search`), and raises NoSafeStep when none down to SMALLEST_SCALE does:
    such a patch only damages, and the caller raises the damping. The original model's
    figures on the remaining rows are per row, and kept in the influence cache with v
    (`per_row`). Each check stops at the first chunk of rows that settles a failure
    (`_Limits.held_loss`).
    --forget match also stops growing s once the marked rows' mean loss reaches the
    held-out rows' (both under the patched model): a retrained model has never seen the
    marked rows, and a random sample of them scores like held-out rows there. Of the last
    s below and the first at or above, it keeps the one nearer the held-out loss (a note
    in `notes`, and `step`'s search, when the marked rows' loss is there already).
    """
    eta = request.options.eta
    if eta != "auto":
        scale = float(eta)
        if not np.isfinite(scale) or scale <= 0:
            raise PumaError(f"--eta {eta}: give a positive multiple of 1/N, or auto")
        return scale
    n = engine.n
    # The mean loss's relative rise, on a seeded subsample.
    picked = _unmarked_sample(marked, GUARD_ROWS, request.options.seed)
    keep = torch.as_tensor(picked, device=engine.device)
    X_keep, y_keep = engine.X[keep].float(), engine.y[keep]
    tolerance = request.options.fit_tolerance
    max_drop = request.options.max_accuracy_drop / 100 + 1e-12

    step = engine.chunk_size

    # Every check runs on the float32 model that would be written (half the cost of a
    # float64 engine's forward passes), its logits summed in float64.
    def patched(scale: float) -> torch.nn.Module:
        return engine.patched_module((scale / n) * x)

    original = patched(0.0)

    def figures0(at: np.ndarray) -> np.ndarray:
        where = torch.as_tensor(at, device=engine.device)
        return _row_figures(original, engine.X[where].float(), engine.y[where], step)

    fit0, fit_accuracy0 = per_row(
        engine, spectrum, "fit0", picked, figures0, request.options.cache
    ).mean(axis=0)
    loss0, accuracy0 = _criterion_figures(original, Xc, yc, step)
    # --forget step: at interpolation the remaining rows' loss is ~0 and any relative rise
    # of it trips the guard; their accuracy is what must hold, as on the held-out rows.
    by_accuracy = request.options.forget in ("step", "match")
    scales = FORGET_SCALES if by_accuracy else AUTO_SCALES

    held_out = _Limits(loss0 * (1 + tolerance) + 1e-9, accuracy0, max_drop)
    if by_accuracy:
        remaining = _Limits(None, fit_accuracy0, max_drop)
    else:
        remaining = _Limits(fit0 * (1 + tolerance) + 1e-9, None, 0.0)
    match = request.options.forget == "match"
    if match:
        where = torch.as_tensor(marked, device=engine.device)
        X_marked, y_marked = engine.X[where].float(), engine.y[where]
        marked0, _ = _criterion_figures(original, X_marked, y_marked, step)
        if marked0 >= loss0:
            match = False
            note = (
                f"--forget match: the marked rows' loss ({marked0:.3g}) is at or above the "
                f"held-out loss ({loss0:.3g}) already, so it sets no step; the step was chosen "
                "as under --forget step"
            )
            if note not in notes:  # once, however often the damping is raised
                notes.append(note)
    # scale -> marked - held-out loss, where the held-out rows held; the remaining rows
    # were checked there only where it is < 0 (a crossing fails the step before them)
    above: dict[float, float] = {}

    held_chunks = -(-len(yc) // step)
    chunks = held_chunks + -(-len(y_keep) // step)

    def passes(scale: float) -> bool:
        """One look at a step size, its progress told chunk by chunk (complete at the end,
        also when a failure settled it early)."""
        phase = f"guard: eta {scale:g}/N"
        try:
            return look(scale, phase)
        finally:
            engine.tell(phase, chunks, chunks)

    def look(scale: float, phase: str) -> bool:
        def told(earlier: int) -> Callable[[int], None]:  # after `earlier` chunks
            return lambda k: engine.tell(phase, earlier + k, chunks)

        model = patched(scale)
        held = held_out.held_loss(model, Xc, yc, step, told(0))  # held-out first
        if held is None:
            return False
        if match:  # the marked rows are few: looked at before the remaining rows
            above[scale] = _criterion_figures(model, X_marked, y_marked, step)[0] - held
            if above[scale] >= 0:
                return False
        return remaining.held_loss(model, X_keep, y_keep, step, told(held_chunks)) is not None

    try:
        chosen = _search(passes, scales)
    except NoSafeStep:
        # more damping unless the shortest step failed by crossing alone (held-out rows
        # held, remaining rows not yet asked)
        if above.get(SMALLEST_SCALE, -1.0) < 0:
            raise
        if remaining.held_loss(patched(SMALLEST_SCALE), X_keep, y_keep, step) is None:
            raise
        return SMALLEST_SCALE  # the marked rows look held out at the shortest step already
    up = 2 * chosen  # the first step past the held-out loss, when the guard held there
    crossed = match and above.get(up, -1.0) >= 0  # (< 0: the remaining rows failed it)
    nearer = crossed and abs(above[up]) < abs(above[chosen])
    kept = nearer and remaining.held_loss(patched(up), X_keep, y_keep, step) is not None
    return up if kept else chosen


def _search(passes: Callable[[float], bool], scales: tuple[float, ...]) -> float:
    """The largest step the guard lets through, taking larger steps to harm more.

    Up from scales[0] (doubling) while they pass. If scales[0] fails: half of it, where
    most such searches end; failing that, SMALLEST_SCALE (NoSafeStep when it fails too:
    the caller raises the damping), then halving from a quarter down to the first that
    passes. A failing look is cheap (`_Limits.held_loss` stops early) and a passing one costs
    a pass over the rows, so the walk down, with two passing looks at most (one when half
    passes, which took two before), beats a bisection (up to four).
    """
    if passes(scales[0]):
        chosen = scales[0]
        for scale in scales[1:]:
            if not passes(scale):
                break
            chosen = scale
        return chosen
    if passes(scales[0] / 2):
        return scales[0] / 2
    if not passes(SMALLEST_SCALE):  # one look at the shortest step before halving to it
        raise NoSafeStep(SMALLEST_SCALE)
    scale = scales[0] / 4
    while scale > SMALLEST_SCALE and not passes(scale):
        scale /= 2
    return scale


def _as_classifier(module: torch.nn.Module) -> Classifier:
    """The patched copy (on the engine's device, the model's)."""
    assert isinstance(module, Classifier)
    return module.eval()
