"""Membership inference: how detectable are points in a model's training set?

Every attack gives each point a score (higher = more likely a member) and is judged on
the targets against points known not to be members: ROC AUC, TPR at low FPR (only where
there are enough non-members for that FPR to mean anything), and, at the attack's own
decision threshold, the share of targets called members (the paper's Table 2 figure)
next to the same share among the non-members, so that noise is not read as proof.

`loss` (Yeom et al. 2018): a point is a member when its loss is below the model's mean
loss on the rows it is trained on. `lira` / `lira-online` (Carlini et al. 2022): shadow
models of the same recipe on random halves of the data pool give, per point, the spread
of a model's logit-scaled confidence when the point is out of (and in) training; the
attacked model's confidence is scored against it. A point is called a member when the
offline score (the OUT CDF) is at least 0.9, or the online log likelihood ratio above 0.
`shokri` (Shokri et al. 2017, the PUMA paper's attack): an MLP (128, 64) learns from the
shadow models which sorted softmax vectors come from training points; a point is called
a member when it says so with probability at least 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.data import Dataset
from puma_cli.errors import PumaError
from puma_cli.evaluation import predict_logits

ATTACKS = ("loss", "lira", "lira-online", "shokri")


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
    members, others = -per_point_loss(model, targets), -per_point_loss(model, nonmembers)
    # A member is a point whose loss is below the threshold: a score at or above -threshold.
    return score_report("loss", members, others, np.nextafter(-threshold, np.inf))


# --- LiRA (Carlini et al. 2022) ------------------------------------------------------------


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), computed stably as z_y - logsumexp(z_others)."""
    logits = logits.double()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def sorted_log_softmax(logits: torch.Tensor) -> np.ndarray:
    """(n, K) log-probabilities, largest first, floored at -30: Shokri's sorted softmax
    on a log scale, so that confidences of 0.999 and 0.99999 stay apart."""
    logp = torch.log_softmax(logits.double(), dim=1).clamp_min(-30.0)
    return torch.sort(logp, dim=1, descending=True).values.float().numpy()


@dataclass(frozen=True)
class ShadowSet:
    """inclusion (S, n) bool: point j in shadow s's training set; phi (S, n) each shadow's
    logit-scaled confidence on each point of the pool; sorted_logp (S, n, K) its sorted
    log-softmax (Shokri's features)."""

    inclusion: np.ndarray
    phi: np.ndarray
    sorted_logp: np.ndarray


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


# --- Shokri et al. 2017 ----------------------------------------------------------------------


def shokri_scores(
    shadows: ShadowSet, features: np.ndarray, seed: int = 0, epochs: int = 40
) -> np.ndarray:
    """P(member) for each row of `features` (m, K), from an MLP (128, 64) trained on the
    shadows' sorted log-softmax, labelled by whether the point was in that shadow's
    training set. Members and non-members weigh the same in its loss, so 0.5 is an
    unbiased decision threshold whatever share of the pool the shadows train on."""
    S, n, K = shadows.sorted_logp.shape
    X = torch.as_tensor(shadows.sorted_logp.reshape(S * n, K), dtype=torch.float32)
    y = torch.as_tensor(shadows.inclusion.reshape(S * n), dtype=torch.float32)
    mean, std = X.mean(dim=0), X.std(dim=0).clamp_min(1e-6)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(K, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    )
    positive = float(y.mean())
    if positive in (0.0, 1.0):
        raise PumaError("the shadow models saw every point or none; raise --shadows")
    loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor((1 - positive) / positive, dtype=torch.float32)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    Xs = (X - mean) / std
    for _ in range(epochs):
        order = torch.randperm(y.numel(), generator=generator)
        for start in range(0, y.numel(), 256):
            batch = order[start : start + 256]
            loss = loss_fn(net(Xs[batch])[:, 0], y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        queries = (torch.as_tensor(features, dtype=torch.float32) - mean) / std
        return torch.sigmoid(net(queries)[:, 0]).double().numpy()


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
