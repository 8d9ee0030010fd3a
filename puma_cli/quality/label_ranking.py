"""Mislabel discovery (Algorithm 2): rank training points by how much they hurt C.

With v = H^-1 grad C cached, psi_i = v . g_i is, to first order, N times the change of
C when point i is removed (Eq. 9): a negative psi means the model does better on
held-out data without the point. Mislabelled points are among the most negative.
Scores, lower = more suspicious:

  puma            psi_i = grad C H^-1 g_i
  ntk             grad C . g_i (influence without the inverse Hessian)
  self-influence  -(g_i H^-1 g_i) (Koh and Liang: points the model bent itself most for)

The confidence filter is Algorithm 2's: points near the decision boundary score badly
whatever their label, so among the k most suspicious, those whose top-class probability
is among the k lowest of all points are moved behind the others (kept, not dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from puma_cli.engine.criterion import CriterionDirection, scores
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.solvers import EXACT_MAX_PARAMETERS, dense_curvature
from puma_cli.errors import PumaError
from puma_cli.io.cache import Cache

SCORES = ("puma", "ntk", "self-influence")


@dataclass(frozen=True)
class LabelRanking:
    """order: positions (into the scored rows), most suspicious first; the rest per row."""

    order: np.ndarray
    score: np.ndarray
    confidence: np.ndarray
    predicted: np.ndarray
    demoted: np.ndarray


def suspicion_scores(
    engine: InfluenceModel, direction: CriterionDirection, method: str, cache: Cache | None = None
) -> np.ndarray:
    """One score per row of the engine's data (n,), lower = more suspicious (`puma`'s are
    removal's psi, shared with it through `cache`)."""
    if method == "puma":
        return scores(engine, direction, None, cache)
    if method == "ntk":
        return engine.directional_derivatives(direction.grad_c).cpu().numpy()
    if method == "self-influence":
        return -_self_influence(engine, direction.damping * direction.lambda_max)
    raise PumaError(f"--score {method!r}: choose puma, ntk or self-influence")


def _self_influence(engine: InfluenceModel, mu: float) -> np.ndarray:
    """g_i (C + mu I)^-1 g_i for every row, C the engine's curvature: K-FAC's or EK-FAC's
    blocks inverted in their eigenbases, a chunk of per-row gradients at a time (any size
    of model); else the dense Hessian or Gauss-Newton matrix through one eigendecomposition
    (up to EXACT_MAX_PARAMETERS)."""
    if engine.kronecker is not None:
        kron, shift = engine.kronecker, engine.weight_decay + mu
        parts = [
            kron.inverse_norms(rows, shift)
            for rows in engine.per_row_gradients(phase="per-row gradients")
        ]
        return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)
    if engine.n_parameters > EXACT_MAX_PARAMETERS:
        raise PumaError(
            f"--score self-influence with --curvature {engine.curvature} needs the dense "
            f"matrix, too large at {engine.n_parameters} parameters (limit "
            f"{EXACT_MAX_PARAMETERS}); use --curvature kfac or ekfac, or --score puma"
        )
    H = dense_curvature(engine)
    eigenvalues, vectors = torch.linalg.eigh(H)
    shift = max(mu, 1e-6 * float(eigenvalues.abs().max()) - float(eigenvalues.min()))
    projected = engine.per_sample_gradients(phase="per-row gradients") @ vectors
    return ((projected**2) / (eigenvalues + shift)).sum(dim=1).cpu().numpy()


def rank_labels(
    scores: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    k: int,
    confidence_filter: bool = True,
) -> LabelRanking:
    """Rank rows by score (ascending), then apply the confidence filter to the top k.

    probs: (n, K) predicted probabilities; labels: (n,) the labels as given.
    """
    order = np.argsort(scores, kind="stable")
    top_confidence = probs.max(axis=1)
    demoted = np.zeros(scores.shape[0], dtype=bool)
    if confidence_filter and 0 < k < scores.shape[0]:
        near_boundary = np.zeros_like(demoted)
        near_boundary[np.argsort(top_confidence, kind="stable")[:k]] = True
        head = order[:k]
        demoted[head[near_boundary[head]]] = True
        order = np.concatenate([head[~near_boundary[head]], head[near_boundary[head]], order[k:]])
    return LabelRanking(
        order=order,
        score=scores,
        confidence=probs[np.arange(labels.shape[0]), labels],
        predicted=probs.argmax(axis=1),
        demoted=demoted,
    )


def found_curve(order: np.ndarray, truth: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Share of the true positives found after reviewing each fraction of the ranking."""
    if not truth.any():
        return np.full(fractions.shape, np.nan)
    hits = np.cumsum(truth[order])
    reviewed = np.clip(np.ceil(fractions * order.size).astype(int), 1, order.size)
    return hits[reviewed - 1] / truth.sum()
