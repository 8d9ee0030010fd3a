"""U-LiRA (Hayes et al. 2024) and the NeurIPS 2023 unlearning challenge's forgetting score:
can an attacker tell a model that unlearned a point from one that never trained on it?

K shadow models are trained on random halves of the attacker's pool (each point in exactly
half of them), and the removal under audit is applied to each shadow for the targets it
held. For every target t there are then two samples of the logit-scaled confidence
phi_t: from the shadows that unlearned t, and from those that never saw it (which also
unlearned their own targets, like every shadow).

- U-LiRA's game, on the shadows: each (shadow, target) pair is scored by the log
  likelihood ratio of two Gaussians (per-target means from the *other* shadows,
  leave-one-out; variances pooled over targets, LiRA's fixed-variance form) and called
  "unlearned" when it is above 0. Accuracy 0.5 and AUC 0.5: indistinguishable from
  retraining. The attacked model itself is scored the same way (its share of targets
  called "unlearned" is reported).
- The challenge's score: per target, every threshold on phi_t is an attack with a false
  positive rate (a never-trained shadow called unlearned) and a false negative rate;
  epsilon_t = max over thresholds of max(log((1 - delta - FPR) / FNR), log((1 - delta -
  FNR) / FPR)), delta = 0.01, the rates counted with half a count of continuity
  correction (see `epsilon`); the score is the mean over targets of 2 / 2^n, n the index
  of epsilon_t's bin of width 0.5 (1 for epsilon < 0.5): 1 when no target can be told
  apart, towards 0 when every one can. With k shadows a side, epsilon cannot exceed
  log(2 (k + 1)), and the maximum over thresholds of a noisy estimate is biased upward:
  even retraining scores below 1 at small k (the challenge used 512 models a side).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from puma_cli import parallel
from puma_cli.audit.shadows import logit_confidence
from puma_cli.data.dataset import Dataset
from puma_cli.io.cache import Cache, Check
from puma_cli.io.checkpoint import Checkpoint
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.shards import train_model
from puma_cli.models.training import Progress

MIN_SHADOWS = 8  # 4 a side: the least a leave-one-out mean and a pooled variance take
DELTA = 0.01
BIN_WIDTH = 0.5
BINS = 13

Unlearn = Callable[[torch.nn.Module, np.ndarray, np.ndarray], torch.nn.Module]
"""(shadow, its training rows in the pool, the targets among them) -> the shadow after the
removal under audit."""


@dataclass(frozen=True)
class UnlearnedShadows:
    """inclusion (K, T): shadow s trained on target t (and then unlearned it); phi (K, T):
    target t's logit-scaled confidence under shadow s after its removal."""

    inclusion: np.ndarray
    phi: np.ndarray


def unlearned_shadows(
    checkpoint: Checkpoint,
    pool: Dataset,
    targets: np.ndarray,
    count: int,
    seed: int,
    device: torch.device | str,
    unlearn: Unlearn,
    cache: Cache | None = None,
    progress: Progress | None = None,
) -> UnlearnedShadows:
    """Train `count` shadows on halves of the pool, apply `unlearn` to each for the
    `targets` (pool rows) it held, and record every target's phi (cached when given)."""
    if cache is not None:
        hit = cache.load({}, _check(count, targets.size))
        if hit is not None:
            tensors = hit[0]
            return UnlearnedShadows(
                tensors["inclusion"].numpy().astype(bool), tensors["phi"].numpy()
            )
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((count, len(pool))), axis=0)
    held = ranks < count // 2  # every point in exactly half of the shadows
    phi = torch.zeros((count, targets.size), dtype=torch.float64)
    labels = torch.as_tensor(pool.y[targets])
    mine = parallel.block(count, "shadow models")
    for done, s in enumerate(mine, start=1):
        rows = np.flatnonzero(held[s])
        shadow = train_model(pool.subset(rows), replace(recipe, seed=recipe.seed + 1 + s),
                             checkpoint.arch.n_classes, device)  # fmt: skip
        own = targets[held[s, targets]]
        model = unlearn(shadow, rows, own) if own.size else shadow
        phi[s] = torch.from_numpy(logit_confidence(predict_logits(model, pool.X[targets]), labels))
        if progress is not None:
            progress(done, len(mine), 0.0)
    parallel.all_reduce(phi)
    inclusion = held[:, targets]
    if cache is not None:
        cache.stage({"inclusion": torch.from_numpy(inclusion.astype(np.uint8)), "phi": phi}, {})
    return UnlearnedShadows(inclusion, phi.numpy())


def _check(count: int, n_targets: int) -> Check:
    def check(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
        inclusion, phi = tensors.get("inclusion"), tensors.get("phi")
        if inclusion is None or phi is None or tuple(phi.shape) != (count, n_targets):
            return "does not hold this audit's shadows: it is stale or damaged"
        if inclusion.dtype != torch.uint8 or tuple(inclusion.shape) != (count, n_targets):
            return "does not hold the shadows' inclusion as (K, targets) uint8"
        if not bool(torch.isfinite(phi).all()):
            return "holds NaN or inf confidences"
        return None

    return check


def _pooled(phi: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-target means over the shadows in `side` (K, T) and the pooled standard deviation."""
    count = side.sum(axis=0)
    mean = np.where(side, phi, 0).sum(axis=0) / np.maximum(count, 1)
    spread = np.where(side, (phi - mean) ** 2, 0).sum() / max(int(count.sum()) - phi.shape[1], 1)
    return mean, max(float(np.sqrt(spread)), 1e-6)


def game_scores(shadows: UnlearnedShadows) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out log likelihood ratios (unlearned over never-trained) of every
    (shadow, target) pair: (the pairs that unlearned, the pairs that never held)."""
    from scipy.stats import norm

    inside, phi = shadows.inclusion, shadows.phi
    _, sd_in = _pooled(phi, inside)
    _, sd_out = _pooled(phi, ~inside)
    n_in, n_out = inside.sum(axis=0), (~inside).sum(axis=0)
    sum_in = np.where(inside, phi, 0).sum(axis=0)
    sum_out = np.where(~inside, phi, 0).sum(axis=0)
    # Leave shadow s out of its own side's mean.
    mu_in = (sum_in - np.where(inside, phi, 0)) / (n_in - inside)
    mu_out = (sum_out - np.where(~inside, phi, 0)) / (n_out - ~inside)
    scores = norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)
    return scores[inside], scores[~inside]


def model_scores(shadows: UnlearnedShadows, phi: np.ndarray) -> np.ndarray:
    """The attacked model's log likelihood ratio per target (all shadows fitted)."""
    from scipy.stats import norm

    mu_in, sd_in = _pooled(shadows.phi, shadows.inclusion)
    mu_out, sd_out = _pooled(shadows.phi, ~shadows.inclusion)
    return norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)


def epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """The challenge's privacy degree of one target from its two samples of phi.

    Rates are counted with half a count of continuity correction, (errors + 0.5) / (n + 1):
    the challenge discards thresholds where a rate is 0, which scores a target whose two
    samples do not overlap at all (the plainest leak) as perfectly forgotten."""
    best = 0.0
    n_u, n_r = unlearned.size, retrained.size
    for threshold in np.unique(np.concatenate([unlearned, retrained])):
        for sign in (1.0, -1.0):  # "unlearned" above, or below, the threshold
            fpr = (float(np.sum(sign * retrained > sign * threshold)) + 0.5) / (n_r + 1)
            fnr = (float(np.sum(sign * unlearned <= sign * threshold)) + 0.5) / (n_u + 1)
            for a, b in ((fpr, fnr), (fnr, fpr)):
                if 1 - delta - a > 0:
                    best = max(best, float(np.log(1 - delta - a) - np.log(b)))
    return best


def forgetting_score(shadows: UnlearnedShadows) -> tuple[float, np.ndarray]:
    """The challenge's F over the targets, and each target's epsilon."""
    eps = np.array(
        [
            epsilon(
                shadows.phi[shadows.inclusion[:, t], t], shadows.phi[~shadows.inclusion[:, t], t]
            )
            for t in range(shadows.phi.shape[1])
        ]
    )
    bins = np.digitize(eps, np.arange(BINS) * BIN_WIDTH)
    return float(np.mean(2.0 / 2.0**bins)), eps
