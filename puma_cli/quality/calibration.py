"""Calibration: ECE with equal-width bins, a differentiable surrogate of it, reliability
bins, and Algorithm 3's three categories of training points that hurt calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_BINS = 1000  # ECE past a thousand bins measures the sample, not the model


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|.

    probs: (n, K) predicted probabilities; labels: (n,) true classes. A prediction's
    confidence is its top probability; bins split [0, 1] into `bins` equal widths,
    right-closed as in Guo et al. (2017), so confidence 1.0 lands in the last bin.
    """
    if probs.shape[0] == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def soft_ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> torch.Tensor:
    """A differentiable stand-in for ECE: soft-binned calibration error.

    Binned ECE is piecewise constant in the model's parameters (a confidence that moves
    inside its bin changes it only through the bin's mean), and its bin edges make the
    gradient zero almost everywhere. Here each confidence belongs to every bin with a
    weight softmax(-(c - centre_b)^2 / t), t = (half a bin width)^2, and |acc - conf| is
    smoothed as sqrt(gap^2 + 1e-8) (after soft-binning calibration, Karandikar et al. 2021).
    The correctness indicator stays hard: the gradient flows through the confidences.
    """
    probs = torch.softmax(logits, dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    centres = (torch.arange(bins, dtype=probs.dtype, device=probs.device) + 0.5) / bins
    temperature = (0.5 / bins) ** 2
    member = torch.softmax(-((confidence[:, None] - centres) ** 2) / temperature, dim=1)
    mass = member.sum(dim=0)
    accuracy = (member * correct[:, None]).sum(dim=0) / mass.clamp_min(1e-12)
    mean_confidence = (member * confidence[:, None]).sum(dim=0) / mass.clamp_min(1e-12)
    gap = torch.sqrt((accuracy - mean_confidence) ** 2 + 1e-8)
    return (mass / confidence.shape[0] * gap).sum()


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width bin: (bins+1,) edges, then count, accuracy and mean confidence."""

    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> ReliabilityBins:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return ReliabilityBins(
        edges=edges,
        count=count,
        accuracy=np.bincount(which, weights=correct, minlength=bins) / safe,
        confidence=np.bincount(which, weights=confidence, minlength=bins) / safe,
    )


def calibration_categories(
    scores: np.ndarray, confidence: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 3: among the k rows whose removal most lowers the criterion (lowest
    scores), those also among the k most confident on their label are over-confident,
    those among the k least confident over-uncertain, the rest other-noise. Row positions."""
    lowest = np.argsort(scores, kind="stable")[:k]
    order = np.argsort(confidence, kind="stable")
    low, high = set(order[:k].tolist()), set(order[-k:].tolist())
    over_confident = np.array(sorted(i for i in lowest.tolist() if i in high), dtype=np.int64)
    over_uncertain = np.array(sorted(i for i in lowest.tolist() if i in low), dtype=np.int64)
    noise = np.array(
        sorted(i for i in lowest.tolist() if i not in low and i not in high), dtype=np.int64
    )
    return over_confident, over_uncertain, noise
