"""Shokri et al. 2017, the PUMA paper's attack: an MLP (128, 64) learns from the shadow
models which sorted softmax vectors come from training points; a point is called a member
when it says so with probability at least 0.5."""

from __future__ import annotations

import numpy as np
import torch

from puma_cli.audit.shadows import ShadowSet
from puma_cli.errors import PumaError


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
