"""The loss-threshold attack (Yeom et al. 2018): a point is a member when its loss is
below the model's mean loss on the rows it is trained on. Needs no shadow models."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from puma_cli.audit.scoring import AttackReport, score_report
from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError
from puma_cli.models.predict import predict_logits


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
