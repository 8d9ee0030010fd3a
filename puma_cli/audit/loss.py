"""The loss-threshold attack (Yeom et al. 2018): a point is a member when its loss is
below the model's mean loss on the rows it is trained on. Needs no shadow models."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.audit.scoring import AttackReport, score_report
from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError
from puma_cli.models.predict import Tell, offset_teller, predict_logits


@torch.no_grad()
def per_point_loss(model: torch.nn.Module, data: Dataset, tell: Tell | None = None) -> np.ndarray:
    logits = predict_logits(model, data.X, tell=tell).double()
    return F.cross_entropy(logits, torch.as_tensor(data.y), reduction="none").numpy()


def loss_attack(
    model: torch.nn.Module,
    targets: Dataset,
    nonmembers: Dataset,
    trained: Dataset,
    tell: Tell | None = None,
) -> AttackReport:
    """Yeom et al.'s threshold attack; scores are negative losses. `tell` hears the rows
    scored, over the trained rows, the targets and the non-members together."""
    if len(targets) == 0 or len(nonmembers) == 0:
        raise PumaError("an attack needs at least one target and one non-member")
    total = len(trained) + len(targets) + len(nonmembers)
    told = [None if tell is None else offset_teller(tell, start, total)
            for start in (0, len(trained), len(trained) + len(targets))]  # fmt: skip
    threshold = float(per_point_loss(model, trained, told[0]).mean())
    members = -per_point_loss(model, targets, told[1])
    others = -per_point_loss(model, nonmembers, told[2])
    # A member is a point whose loss is below the threshold: a score at or above -threshold.
    return score_report("loss", members, others, np.nextafter(-threshold, np.inf))
