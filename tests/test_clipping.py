"""`--clip-grad-norm C`: each step's gradient scaled down to norm C at most (torch's
clip_grad_norm_, as transformer recipes train), recorded and re-run by retraining, SISA,
shadow models and the fine-tuning baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, assert_recipe_setting, run, run_json

from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.training import optimizer_step


def test_a_step_moves_the_weights_by_at_most_the_clipped_norm() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    recipe = TrainRecipe(optimizer="sgd", lr=1.0, clip_grad_norm=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)  # no momentum: one step is -lr g
    loss = 1000 * net(torch.randn(8, 4)).square().mean()
    optimizer_step(net, optimizer, loss, recipe)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-5)


def test_clipping_is_recorded_and_re_run(data_dir: Path, tmp_path: Path) -> None:
    model = assert_recipe_setting(
        data_dir / "radial.csv", tmp_path, "--clip-grad-norm", "0.05", "clip_grad_norm"
    )
    out = tmp_path / "tuned.safetensors"
    run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", "finetune",
        "-o", out,
    )  # fmt: skip
    assert run_json("info", out)["recipe"]["clip_grad_norm"] == 0.05


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_clipping_norm_below_zero_is_refused(data_dir: Path, tmp_path: Path, value: str) -> None:
    out = tmp_path / "m.safetensors"
    result = run("train", data_dir / "radial.csv", "--clip-grad-norm", value, "-o", out)
    assert_clean_error(result, f"--clip-grad-norm {value}")
    assert not out.exists()
