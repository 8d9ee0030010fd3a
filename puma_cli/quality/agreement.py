"""How close two models' predictions are: the mean KL divergence of one's softmax from the
other's, the figure unlearning papers compare an approximate removal with retraining by."""

from __future__ import annotations

import numpy as np
import torch

from puma_cli.models.predict import predict_logits


def mean_kl(reference: torch.nn.Module, model: torch.nn.Module, X: np.ndarray) -> float:
    """mean_i KL(p_reference(x_i) || p_model(x_i)) in nats, over the rows of X."""
    if len(X) == 0:
        return float("nan")
    log_p = torch.log_softmax(predict_logits(reference, X).double(), dim=1)
    log_q = torch.log_softmax(predict_logits(model, X).double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
