"""Batched prediction: the batch size follows the rows' size on a CPU, never the result."""

import numpy as np
import pytest
import torch

from puma_cli.models.predict import (
    CPU_BATCH_VALUES,
    MAX_BATCH,
    MIN_CPU_BATCH,
    predict_logits,
    prediction_batch,
)
from puma_cli.models.zoo import ResNet18


@pytest.mark.parametrize(
    ("row_values", "rows"),
    [
        (3 * 32 * 32, 64),  # CIFAR-size images: 21 rows would fit; the floor
        (28 * 28, 83),  # MNIST-size
        (8 * 8, 1024),  # the shipped digits
        (20, 3276),  # a small MLP's rows
        (2, 4096),  # the cap
    ],
)
def test_cpu_batches_hold_a_bounded_number_of_input_values(row_values: int, rows: int) -> None:
    assert prediction_batch(row_values, torch.device("cpu")) == rows
    assert rows in (MIN_CPU_BATCH, MAX_BATCH) or rows * row_values <= CPU_BATCH_VALUES


def test_an_accelerator_takes_large_batches_whatever_the_rows() -> None:
    assert prediction_batch(3 * 32 * 32, torch.device("cuda")) == MAX_BATCH


def test_the_logits_do_not_depend_on_the_batches() -> None:
    torch.manual_seed(0)
    net = ResNet18(3, 10, width=4).eval()
    X = np.random.default_rng(0).normal(size=(150, 3, 32, 32)).astype(np.float32)
    default = predict_logits(net, X)  # 64-row batches: 64, 64, 22
    whole = predict_logits(net, X, batch_size=len(X))
    assert default.shape == (150, 10)
    assert torch.allclose(default, whole, atol=1e-4, rtol=1e-4)
    assert predict_logits(net, X[:0]).shape == (0,)


def test_each_batch_is_told() -> None:
    """`tell` hears the rows done after each batch, ending at all of them."""
    net = torch.nn.Linear(4, 3)
    X = np.zeros((10, 4), dtype=np.float32)
    told: list[tuple[int, int]] = []
    predict_logits(net, X, batch_size=4, tell=lambda done, total: told.append((done, total)))
    assert told == [(4, 10), (8, 10), (10, 10)]
