"""`--lr-warmup-epochs W`: the learning rate rises linearly from 1 % of the recipe's over
the first W epochs (torchvision's reference recipes' `linear` warmup), then follows the
schedule over the epochs left. Recorded, so that retraining and shadow models warm up
too: a transformer recipe's rate without its warmup can diverge in the first epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, assert_recipe_setting, run

from puma_cli.models.augment import lr_scheduler


def _rates(schedule: str, epochs: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    stepper = lr_scheduler(optimizer, schedule, epochs, warmup)
    assert stepper is not None
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # an epoch's steps, then the schedule's
        stepper.step()
    return rates


def test_warmup_rises_from_one_percent_then_runs_the_schedule_over_what_is_left() -> None:
    cosine = [0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2]  # over 4 epochs
    assert _rates("cosine", 6, 2) == pytest.approx([0.001, 0.0505, *cosine])
    assert _rates("constant", 4, 2) == pytest.approx([0.001, 0.0505, 0.1, 0.1])
    assert _rates("step", 10, 2) == pytest.approx(
        [0.001, 0.0505, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_a_warmup_longer_than_a_slice_leaves_it_one_epoch_at_the_full_rate() -> None:
    """A SISA slice runs the schedule over its own epochs, fewer than the recipe's."""
    assert _rates("constant", 2, 5) == pytest.approx([0.001, 0.1])


def test_warmup_is_recorded_and_retraining_re_runs_it(data_dir: Path, tmp_path: Path) -> None:
    assert_recipe_setting(
        data_dir / "radial.csv", tmp_path, "--lr-warmup-epochs", "2", "lr_warmup_epochs"
    )


@pytest.mark.parametrize(("value", "fragment"), [("-1", "--lr-warmup-epochs -1"), ("4", "fewer")])
def test_a_warmup_that_cannot_be_is_refused(
    data_dir: Path, tmp_path: Path, value: str, fragment: str
) -> None:
    out = tmp_path / "m.safetensors"
    result = run(
        "train", data_dir / "radial.csv", "--epochs", "4", "--lr-warmup-epochs", value, "-o", out
    )
    assert_clean_error(result, fragment)
    assert not out.exists()
