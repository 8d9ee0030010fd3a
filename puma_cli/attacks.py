"""Membership inference: how detectable are points in a model's training set?

Every attack gives each point a score (higher = more likely a member) and is judged on
the targets against points known not to be members: ROC AUC, TPR at low FPR (only where
there are enough non-members for that FPR to mean anything), and, at the attack's own
decision threshold, the share of targets called members (the paper's Table 2 figure)
next to the same share among the non-members, so that noise is not read as proof.

`loss` (Yeom et al. 2018): a point is a member when its loss is below the model's mean
loss on the rows it is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.data import Dataset
from puma_cli.errors import PumaError
from puma_cli.evaluation import predict_logits

ATTACKS = ("loss",)


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


@torch.no_grad()
def per_point_loss(model: torch.nn.Module, data: Dataset) -> np.ndarray:
    logits = predict_logits(model, data.X).double()
    return F.cross_entropy(logits, torch.as_tensor(data.y), reduction="none").numpy()


def loss_attack(
    model: torch.nn.Module, targets: Dataset, nonmembers: Dataset, trained: Dataset
) -> AttackReport:
    """Yeom et al.'s threshold attack; scores are negative losses."""
    if len(targets) == 0 or len(nonmembers) == 0:
        raise PumaError("an attack needs at least one target and one non-member")
    threshold = float(per_point_loss(model, trained).mean())
    target_loss, other_loss = per_point_loss(model, targets), per_point_loss(model, nonmembers)
    fpr, tpr = roc_curve(-target_loss, -other_loss)
    notes = []
    if min(len(targets), len(nonmembers)) < 30:
        notes.append(
            f"only {len(targets)} targets and {len(nonmembers)} non-members: AUC and rates carry "
            "a wide margin of error at this size"
        )
    low_fpr = [t for t in (0.01, 0.001) if len(nonmembers) * t < 1]
    if low_fpr:
        notes.append(
            f"{len(nonmembers)} non-members cannot resolve an FPR of "
            f"{' or '.join(f'{100 * t:g} %' for t in low_fpr)}: reported as null"
        )
    return AttackReport(
        attack="loss",
        n_targets=len(targets),
        n_nonmembers=len(nonmembers),
        auc=auc_score(-target_loss, -other_loss),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, len(nonmembers), 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(fpr, tpr, len(nonmembers), 0.001),
        member_rate=float((target_loss < threshold).mean()),
        nonmember_rate=float((other_loss < threshold).mean()),
        threshold=threshold,
        notes=notes,
    )
