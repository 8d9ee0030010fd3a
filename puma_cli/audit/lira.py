"""LiRA (Carlini et al. 2022): shadow models of the same recipe on random halves of the
data pool give, per point, the spread of a model's logit-scaled confidence when the point
is out of (and in) training; the attacked model's confidence is scored against it. A
point is called a member when the offline score (the OUT CDF) is at least 0.9, or the
online log likelihood ratio above 0."""

from __future__ import annotations

import numpy as np

from puma_cli.audit.shadows import ShadowSet
from puma_cli.errors import PumaError


def lira_scores(shadows: ShadowSet, phi: np.ndarray, online: bool) -> np.ndarray:
    """Membership scores for the pool's points given the attacked model's phi (n,).

    With the few shadows a CLI can afford, per-point variances are too noisy, so the
    variance is pooled over all points (LiRA's fixed-variance variant); the means are
    per point. offline: P(phi_out <= phi), the OUT Gaussian's CDF. online: the log
    likelihood ratio of the IN against the OUT Gaussian.
    """
    from scipy.stats import norm

    inside = shadows.inclusion
    out_count = (~inside).sum(axis=0)
    if (out_count == 0).any() or (online and (inside.sum(axis=0) == 0).any()):
        raise PumaError("some points have no shadow model on one side; raise --shadows")
    mu_out = np.where(~inside, shadows.phi, 0).sum(axis=0) / out_count
    sd_out = float(
        np.sqrt(np.where(~inside, (shadows.phi - mu_out) ** 2, 0).sum() / out_count.sum())
    )
    sd_out = max(sd_out, 1e-6)
    if not online:
        return norm.cdf((phi - mu_out) / sd_out)
    in_count = inside.sum(axis=0)
    mu_in = np.where(inside, shadows.phi, 0).sum(axis=0) / in_count
    sd_in = max(
        float(np.sqrt(np.where(inside, (shadows.phi - mu_in) ** 2, 0).sum() / in_count.sum())), 1e-6
    )
    return norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)
