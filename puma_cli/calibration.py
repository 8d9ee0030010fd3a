"""Calibration measures: expected calibration error with equal-width confidence bins."""

from __future__ import annotations

import numpy as np


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
