"""PUMA's step length: the guarded line search over eta (forward passes only).

The patch's direction is fixed by one solve; its length, eta = s / N, is searched. `auto`
doubles s while the patched model keeps its performance on the remaining rows and the
held-out rows (`choose_scale`), each look stopped at the first chunk of rows that
settles a failure (`Limits.held_loss`); when no step down to SMALLEST_SCALE passes it
raises NoSafeStep, and the caller (`puma._patch`) raises the damping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.engine.criterion import (
    CriterionDirection,
    per_row,
)
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.errors import PumaError
from puma_cli.unlearn import RemovalRequest

AUTO_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SMALLEST_SCALE = 1 / 64  # the guard's smallest step, before it raises the damping
FORGET_SCALES = tuple(2.0**k for k in range(13))  # --forget step: up to 4096 / N
GUARD_ROWS = 8192  # remaining rows the `auto` guard checks the training loss on


def criterion_figures(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int
) -> tuple[float, float]:
    """The mean cross-entropy and the accuracy over the rows."""
    loss, accuracy = row_figures(model, X, y, chunk).mean(axis=0)
    return float(loss), float(accuracy)


def row_figures(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int) -> np.ndarray:
    """(n, 2) float64: each row's cross-entropy and whether the model predicts its label."""
    with torch.no_grad():
        logits = torch.cat([model(X[i : i + chunk]).double() for i in range(0, len(X), chunk)])
    losses = F.cross_entropy(logits, y, reduction="none")
    return torch.stack([losses, (logits.argmax(1) == y).double()], dim=1).cpu().numpy()


def unmarked_sample(marked: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` unmarked positions at random (seeded; 0 or more than there are: all), sorted:
    the first unmarked ones of one seeded order of every row, so that two requests that
    mark different points draw nearly the same rows, and the second finds their scores in
    the cache."""
    if not 0 < size < int((~marked).sum()):
        return np.flatnonzero(~marked)
    order = np.random.default_rng(seed).permutation(marked.size)
    return np.sort(order[~marked[order]][:size])


@dataclass(frozen=True)
class Limits:
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
        `criterion_figures` over all the rows would give, taken chunk by chunk (`done(k)`
        after the k-th) and stopped at the first chunk after which it can only fail: losses
        are non-negative, and the rows still to come can at most all be predicted right. A
        broken step (most of those the search tries past the one it keeps) costs a few
        chunks, not a pass."""
        n = int(y.shape[0])
        parts, total, correct = [], 0.0, 0
        for k, start in enumerate(range(0, n, chunk), 1):
            figures = row_figures(model, X[start : start + chunk], y[start : start + chunk], chunk)
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


def choose_scale(
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
    that passes (`search`), and raises NoSafeStep when none down to SMALLEST_SCALE does:
    such a patch only damages, and the caller raises the damping. The original model's
    figures on the remaining rows are per row, and kept in the influence cache with v
    (`per_row`). Each check stops at the first chunk of rows that settles a failure
    (`Limits.held_loss`).
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
    guard = _Guard.over(request, engine, spectrum, x, marked, Xc, yc, notes)
    try:
        chosen = search(guard.passes, guard.scales)
    except NoSafeStep:
        # more damping unless the shortest step failed by crossing alone (held-out rows
        # held, remaining rows not yet asked)
        if guard.above.get(SMALLEST_SCALE, -1.0) < 0 or not guard.keeps_remaining(SMALLEST_SCALE):
            raise
        return SMALLEST_SCALE  # the marked rows look held out at the shortest step already
    up = 2 * chosen  # the first step past the held-out loss, when the guard held there
    crossed = guard.match and guard.above.get(up, -1.0) >= 0  # (< 0: remaining rows failed)
    nearer = crossed and abs(guard.above[up]) < abs(guard.above[chosen])
    return up if nearer and guard.keeps_remaining(up) else chosen


@dataclass
class _Guard:
    """What `choose_scale`'s search looks at: the step x / N along the patch, the limits on
    the held-out rows and on a sample of the remaining ones, and under --forget match the
    marked rows, whose loss less the held-out loss at each scale looked at is `above`
    (where the held-out rows held; the remaining rows were checked there only where it is
    < 0: a crossing fails the step before them)."""

    engine: InfluenceModel
    x: torch.Tensor
    scales: tuple[float, ...]
    held_out: Limits
    remaining: Limits
    Xc: torch.Tensor
    yc: torch.Tensor
    X_keep: torch.Tensor
    y_keep: torch.Tensor
    marked_rows: tuple[torch.Tensor, torch.Tensor] | None  # (X, y), under --forget match
    above: dict[float, float] = field(default_factory=dict)

    @classmethod
    def over(
        cls,
        request: RemovalRequest,
        engine: InfluenceModel,
        spectrum: CriterionDirection,
        x: torch.Tensor,
        marked: np.ndarray,
        Xc: torch.Tensor,
        yc: torch.Tensor,
        notes: list[str],
    ) -> _Guard:
        """The limits measured on the original model: the held-out rows' loss and accuracy,
        and the remaining rows' (on a seeded sample, per row, cached with v)."""
        options, step = request.options, engine.chunk_size
        picked = unmarked_sample(marked, GUARD_ROWS, options.seed)
        keep = torch.as_tensor(picked, device=engine.device)
        original = _patched(engine, x, 0.0)

        def figures0(at: np.ndarray) -> np.ndarray:
            where = torch.as_tensor(at, device=engine.device)
            return row_figures(original, engine.X[where].float(), engine.y[where], step)

        fit0, fit_accuracy0 = per_row(
            engine, spectrum, "fit0", picked, figures0, options.cache
        ).mean(axis=0)
        loss0, accuracy0 = criterion_figures(original, Xc, yc, step)
        tolerance, max_drop = options.fit_tolerance, options.max_accuracy_drop / 100 + 1e-12
        # --forget step: at interpolation the remaining rows' loss is ~0 and any relative
        # rise of it trips the guard; their accuracy is what must hold, as on the held-out rows.
        by_accuracy = options.forget in ("step", "match")
        return cls(
            engine,
            x,
            scales=FORGET_SCALES if by_accuracy else AUTO_SCALES,
            held_out=Limits(loss0 * (1 + tolerance) + 1e-9, accuracy0, max_drop),
            remaining=Limits(None, fit_accuracy0, max_drop)
            if by_accuracy
            else Limits(fit0 * (1 + tolerance) + 1e-9, None, 0.0),
            Xc=Xc,
            yc=yc,
            X_keep=engine.X[keep].float(),
            y_keep=engine.y[keep],
            marked_rows=_marked_below(original, engine, marked, loss0, notes)
            if options.forget == "match"
            else None,
        )

    @property
    def match(self) -> bool:
        return self.marked_rows is not None

    def patched(self, scale: float) -> torch.nn.Module:
        return _patched(self.engine, self.x, scale)

    def passes(self, scale: float) -> bool:
        """One look at a step size, its progress told chunk by chunk (complete at the end,
        also when a failure settled it early)."""
        phase = f"guard: eta {scale:g}/N"
        step = self.engine.chunk_size
        held_chunks = -(-len(self.yc) // step)
        chunks = held_chunks + -(-len(self.y_keep) // step)

        def told(earlier: int) -> Callable[[int], None]:  # after `earlier` chunks
            return lambda k: self.engine.tell(phase, earlier + k, chunks)

        try:
            model = self.patched(scale)
            held = self.held_out.held_loss(model, self.Xc, self.yc, step, told(0))
            if held is None:  # held-out first
                return False
            if self.marked_rows is not None:  # the marked rows are few: before the remaining
                self.above[scale] = criterion_figures(model, *self.marked_rows, step)[0] - held
                if self.above[scale] >= 0:
                    return False
            return (
                self.remaining.held_loss(model, self.X_keep, self.y_keep, step, told(held_chunks))
                is not None
            )
        finally:
            self.engine.tell(phase, chunks, chunks)

    def keeps_remaining(self, scale: float) -> bool:
        """Whether the remaining rows hold at `scale` (their look alone)."""
        model = self.patched(scale)
        step = self.engine.chunk_size
        return self.remaining.held_loss(model, self.X_keep, self.y_keep, step) is not None


def _patched(engine: InfluenceModel, x: torch.Tensor, scale: float) -> torch.nn.Module:
    """The model patched by the step (scale / N) x, as the float32 model that would be
    written (half the cost of a float64 engine's forward passes); every check sums its
    logits in float64."""
    return engine.patched_module((scale / engine.n) * x)


def _marked_below(
    original: torch.nn.Module,
    engine: InfluenceModel,
    marked: np.ndarray,
    loss0: float,
    notes: list[str],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """--forget match's marked rows, or None (and a note) where their loss is at or above
    the held-out loss `loss0` already: there is nothing to aim at."""
    where = torch.as_tensor(marked, device=engine.device)
    X_marked, y_marked = engine.X[where].float(), engine.y[where]
    marked0, _ = criterion_figures(original, X_marked, y_marked, engine.chunk_size)
    if marked0 < loss0:
        return X_marked, y_marked
    note = (
        f"--forget match: the marked rows' loss ({marked0:.3g}) is at or above the held-out "
        f"loss ({loss0:.3g}) already, so it sets no step; the step was chosen as under "
        "--forget step"
    )
    if note not in notes:  # once, however often the damping is raised
        notes.append(note)
    return None


def search(passes: Callable[[float], bool], scales: tuple[float, ...]) -> float:
    """The largest step the guard lets through, taking larger steps to harm more.

    Up from scales[0] (doubling) while they pass. If scales[0] fails: half of it, where
    most such searches end; failing that, SMALLEST_SCALE (NoSafeStep when it fails too:
    the caller raises the damping), then halving from a quarter down to the first that
    passes. A failing look is cheap (`Limits.held_loss` stops early) and a passing one costs
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
