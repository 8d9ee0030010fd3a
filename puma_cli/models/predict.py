"""Predictions in batches, on whatever device the model lives on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Tell = Callable[[int, int], None]
"""Told after each batch of a long pass: (rows done, rows in all)."""
Phases = Callable[[str, int, int], None]
"""Progress of a command's long phases: (what, done, total), e.g. ("scores", 3, 10)."""

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def as_tensor(X: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """X as a tensor of `dtype`: a read-only memory map (an NPZ puma maps) is copied, as
    torch cannot share it; anything else converts as torch.as_tensor does."""
    if isinstance(X, np.ndarray) and not X.flags.writeable:
        X = np.array(X, dtype=_NUMPY.get(dtype, X.dtype))
    return torch.as_tensor(X, dtype=dtype, device=device)


def phase_teller(phases: Phases | None, phase: str) -> Tell | None:
    """A `Tell` that reports to `phases` under the name `phase`, or None without one."""
    if phases is None:
        return None
    return lambda done, total: phases(phase, done, total)


def offset_teller(tell: Tell, start: int, total: int) -> Tell:
    """A `Tell` for one part of a longer pass: the part's rows start at `start` of `total`."""
    return lambda done, _rows: tell(start + done, total)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# Rows per prediction batch. On a CPU a batch holds at most CPU_BATCH_VALUES input values
# (MIN_CPU_BATCH to MAX_BATCH rows; a GPU takes MAX_BATCH): a convolution's activations are
# tens of times its input, and past the cache they cost several times more a row.
# Measured per row against 4,096-row batches, 2 cores: ResNet-18 (width 16, 3x32x32)
# 0.81 ms against 2.64, the paper's DenseNet (1x32x32) 5.3 against 23.7, the small CNN on
# 28x28 0.086 against 0.306; on 8x8 digits and on MLPs of 20 to 200 features either size
# costs the same.
MAX_BATCH = 4096
CPU_BATCH_VALUES = 65_536
MIN_CPU_BATCH = 64


def prediction_batch(row_values: int, device: torch.device) -> int:
    """Rows per batch for rows of `row_values` input values each on `device`."""
    if device.type != "cpu":
        return MAX_BATCH
    return max(MIN_CPU_BATCH, min(MAX_BATCH, CPU_BATCH_VALUES // max(1, row_values)))


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    X: np.ndarray,
    batch_size: int | None = None,
    tell: Tell | None = None,
) -> torch.Tensor:
    """X: (n, *input_shape) -> logits (n, K) float32 on the CPU, in batches of `batch_size`
    rows (default: `prediction_batch`); `tell` hears the rows done after each batch."""
    device = device_of(model)
    model.eval()
    n = X.shape[0]
    if batch_size is None:
        batch_size = prediction_batch(int(np.prod(X.shape[1:])), device)
    out = []
    for i in range(0, n, batch_size):
        out.append(model(as_tensor(X[i : i + batch_size], torch.float32, device)).cpu())
        if tell is not None:
            tell(min(n, i + batch_size), n)
    return torch.cat(out) if out else torch.empty(0)
