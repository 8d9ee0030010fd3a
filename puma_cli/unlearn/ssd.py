"""Selective Synaptic Dampening (Foster et al. 2023): a retrain-free, data-free step.

Importance is the diagonal of the empirical Fisher: the mean over rows of each per-row
loss gradient squared, once over every row trained on (D) and once over the marked rows
(D_f). A parameter that matters far more to the marked rows than to the data,
I_f > alpha * I_D, is scaled by beta = min(lambda * I_D / I_f, 1); every other
parameter is left exactly as it was. The paper's defaults: alpha 10, lambda 1.

Choice: per-row squared gradients (the Fisher's definition), not the squares of
mini-batch gradients the reference code accumulates; it makes I_D and I_f comparable
whatever the batch size. Its consequence: I_D is a mean over every row, the marked ones
too, so I_f can be at most 1/share times I_D (share: the marked rows' part of the rows
trained on). A marking of 10 % or more of the data (a whole class of ten) can select
nothing at alpha 10; the report then says so and what --alpha would select.
"""

from __future__ import annotations

import torch

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.training_engine import training_engine
from puma_cli.io.checkpoint import single_model
from puma_cli.models.architectures import Classifier
from puma_cli.unlearn import RemovalRequest, RemovalResult, register


def fisher_diagonal(engine: InfluenceModel, rows: torch.Tensor | None, phase: str) -> torch.Tensor:
    """Mean over `rows` (positions in the engine's data; None: every row, not copied) of
    the squared per-row gradients, summed in float64 a bounded chunk of them at a time
    (`per_row_gradients`), told as `phase` chunk by chunk."""
    total = torch.zeros_like(engine.theta, dtype=torch.float64)
    X, y = (None, None) if rows is None else (engine.X[rows], engine.y[rows])
    for grads in engine.per_row_gradients(X, y, phase):
        total += (grads.double() ** 2).sum(dim=0)
    return total / max(engine.n if rows is None else rows.numel(), 1)


def dampen(
    theta: torch.Tensor, full: torch.Tensor, forget: torch.Tensor, alpha: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's rule on flat vectors: (new theta, mask of the parameters it touched)."""
    selected = forget > alpha * full
    beta = torch.clamp(lam * full / forget.clamp_min(torch.finfo(forget.dtype).tiny), max=1.0)
    new = torch.where(selected, theta * beta.to(theta.dtype), theta)
    return new, selected


@register("ssd")
def ssd(request: RemovalRequest) -> RemovalResult:
    options = request.options
    model = single_model(request.checkpoint, "--method ssd")
    trained = request.trained_rows
    engine = training_engine(
        request.checkpoint, request.dataset, trained, options.precision, phases=request.phases
    )
    positions = torch.searchsorted(torch.from_numpy(trained), torch.from_numpy(request.marked)).to(
        engine.device
    )
    share = positions.numel() / max(engine.n, 1)
    full = fisher_diagonal(engine, None, "importance: every row")
    forget = fisher_diagonal(engine, positions, "importance: marked rows")
    theta = engine.theta.double()
    new_theta, selected = dampen(theta, full, forget, options.ssd_alpha, options.ssd_lambda)
    warnings = [] if bool(selected.any()) else [_nothing_dampened(options.ssd_alpha, share)]
    patched = engine.patched_module(new_theta - theta)
    assert isinstance(patched, Classifier)
    patched = patched.to(next(model.parameters()).device).eval()
    return RemovalResult(
        model=patched,
        method="ssd",
        parameters={
            "alpha": options.ssd_alpha,
            "lambda": options.ssd_lambda,
            "dampened": int(selected.sum()),
            "parameters": int(selected.numel()),
        },
        warnings=warnings,
    )


def _nothing_dampened(alpha: float, share: float) -> str:
    """Why SSD left every parameter as it was, and what would change that."""
    if share > 0 and alpha >= 1 / share:
        return (
            f"SSD dampened no parameter: the marked rows are {share:.1%} of the rows trained "
            f"on, so no parameter can matter more than {1 / share:.1f} times as much to them "
            f"as to all rows (whose mean includes them), and --alpha {alpha:g} asks for more; "
            f"the model is unchanged. Give --alpha below {1 / share:.1f} (lower forgets more)"
        )
    return (
        f"SSD dampened no parameter: none matters more than --alpha {alpha:g} times as much "
        "to the marked rows as to all rows; the model is unchanged. Lower --alpha to dampen "
        "some (lower forgets more)"
    )
