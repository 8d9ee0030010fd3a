"""`--optimizer adam|adamw|sgd`: the recipe's optimiser is recorded, re-run by retraining,
and tells the engine whether weight decay is a term of the training loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_json

from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.models.recipe import TrainRecipe, loss_weight_decay
from puma_cli.models.training import make_optimizer


def _train(data_dir: Path, out: Path, optimizer: str) -> dict[str, object]:
    return run_json(
        "train", data_dir / "radial.csv", "--hidden", "8", "--epochs", "5",
        "--optimizer", optimizer, "--weight-decay", "0.05", "--device", "cpu", "-o", out,
    )  # fmt: skip


def test_adamw_is_torchs_adamw_with_the_recipes_rate_and_decay() -> None:
    net = torch.nn.Linear(2, 2)
    recipe = TrainRecipe(optimizer="adamw", lr=0.01, weight_decay=0.05)
    optimizer = make_optimizer(net, recipe)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert type(make_optimizer(net, TrainRecipe(optimizer="adam"))) is torch.optim.Adam


@pytest.mark.parametrize(("optimizer", "expected"), [("adam", 0.05), ("sgd", 0.05), ("adamw", 0.0)])
def test_decoupled_decay_is_not_a_term_of_the_loss(optimizer: str, expected: float) -> None:
    """Adam's and SGD's weight decay is the gradient of decay / 2 * |theta|^2, so the engine
    adds it to the Hessian; AdamW shrinks the weights beside the loss, not through it."""
    recipe = TrainRecipe(optimizer=optimizer, weight_decay=0.05).to_dict()
    assert loss_weight_decay(recipe) == expected
    assert loss_weight_decay({}) == 0.0  # a recipe that records none


def test_adamw_trains_retrains_and_removes(data_dir: Path, tmp_path: Path) -> None:
    adamw, adam = tmp_path / "adamw.safetensors", tmp_path / "adam.safetensors"
    _train(data_dir, adamw, "adamw")
    _train(data_dir, adam, "adam")
    assert run_json("info", adamw)["recipe"]["optimizer"] == "adamw"
    # Decoupled decay is another update from Adam's coupled one: other weights.
    a, b = load_checkpoint(adamw).model.state_dict(), load_checkpoint(adam).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ids = tmp_path / "ids.txt"
    run_json("mark", data_dir / "radial.csv", "--random", "0.05", "-o", ids)
    retrained = run_json(
        "remove", "-m", adamw, "--marked", ids, "--method", "retrain",
        "-o", tmp_path / "rt.safetensors", "--device", "cpu",
    )  # fmt: skip
    assert retrained["removed"] > 0
    assert run_json("info", tmp_path / "rt.safetensors")["recipe"]["optimizer"] == "adamw"
    removed = run_json(
        "remove", "-m", adamw, "--marked", ids, "-o", tmp_path / "p.safetensors",
        "--device", "cpu",
    )  # fmt: skip
    assert removed["removed"] > 0 and removed["marked_loss_after"] > removed["marked_loss_before"]
