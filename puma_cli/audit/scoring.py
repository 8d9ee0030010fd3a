"""How an attack is judged: ROC AUC, TPR at low FPR, and member rates at a threshold.

Every attack gives each point a score (higher = more likely a member) and is judged on
the targets against points known not to be members: ROC AUC, TPR at low FPR (only where
there are enough non-members for that FPR to mean anything), and, at the attack's own
decision threshold, the share of targets called members (the paper's Table 2 figure)
next to the same share among the non-members, so that noise is not read as proof.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AttackReport:
    attack: str
    n_targets: int
    n_nonmembers: int
    auc: float
    tpr_at_1pct_fpr: float | None
    tpr_at_01pct_fpr: float | None
    member_rate: float
    nonmember_rate: float
    threshold: float
    notes: list[str] = field(default_factory=list)
    accuracy: float | None = None  # balanced: (member rate + 1 - non-member rate) / 2
    forgetting_score: float | None = None  # u-lira: the unlearning challenge's F
    model_flagged: float | None = None  # u-lira: share of targets the model gives away
    shadows: int | None = None  # the shadow models the scores rest on (lira, shokri)


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every threshold, scores higher = member; both start at 0, end at 1."""
    scores = np.concatenate([members, nonmembers])
    is_member = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    order = np.argsort(-scores, kind="stable")
    sorted_scores, labels = scores[order], is_member[order]
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    tpr = np.r_[0.0, np.cumsum(labels)[distinct] / members.size]
    fpr = np.r_[0.0, np.cumsum(1 - labels)[distinct] / nonmembers.size]
    return fpr, tpr


def auc_score(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([members, nonmembers]))
    u = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * nonmembers.size))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, n_nonmembers: int, target: float) -> float | None:
    """Largest TPR with FPR <= target; None when fewer than 1/target non-members exist."""
    if n_nonmembers * target < 1:
        return None
    return float(tpr[fpr <= target + 1e-12].max())


def score_report(
    name: str, members: np.ndarray, nonmembers: np.ndarray, threshold: float
) -> AttackReport:
    """An AttackReport from membership scores (higher = member) and a decision threshold."""
    fpr, tpr = roc_curve(members, nonmembers)
    notes = _size_notes(members.size, nonmembers.size)
    return AttackReport(
        attack=name,
        n_targets=int(members.size),
        n_nonmembers=int(nonmembers.size),
        auc=auc_score(members, nonmembers),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, nonmembers.size, 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(fpr, tpr, nonmembers.size, 0.001),
        member_rate=float((members >= threshold).mean()),
        nonmember_rate=float((nonmembers >= threshold).mean()),
        threshold=threshold,
        notes=notes,
        accuracy=0.5
        * (float((members >= threshold).mean()) + 1 - float((nonmembers >= threshold).mean())),
    )


def _size_notes(n_targets: int, n_nonmembers: int) -> list[str]:
    notes = []
    if min(n_targets, n_nonmembers) < 30:
        notes.append(
            f"only {n_targets} targets and {n_nonmembers} non-members: AUC and rates carry "
            "a wide margin of error at this size"
        )
    low_fpr = [t for t in (0.01, 0.001) if n_nonmembers * t < 1]
    if low_fpr:
        notes.append(
            f"{n_nonmembers} non-members cannot resolve an FPR of "
            f"{' or '.join(f'{100 * t:g} %' for t in low_fpr)}: reported as null"
        )
    return notes
