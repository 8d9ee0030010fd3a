"""`--label-smoothing`: recorded in the recipe, trained with by every command that trains,
and the loss the engine differentiates; the held-out criterion and the figures a report
gives stay the plain cross-entropy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clean_error, assert_recipe_setting, run, run_json
from safetensors.torch import save_file

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.io.checkpoint import load_checkpoint

SMOOTH = 0.2


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return net.double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, dtype=torch.float64, generator=generator)
    return X, torch.randint(0, 3, (40,), generator=generator)


def test_the_engine_differentiates_the_smoothed_loss() -> None:
    net, (X, y) = _net(), _data()
    engine = InfluenceModel(net, X, y, label_smoothing=SMOOTH, chunk_size=16)
    theta = engine.theta
    with torch.no_grad():
        smoothed = F.cross_entropy(net(X), y, label_smoothing=SMOOTH, reduction="none")
        plain = F.cross_entropy(net(X), y, reduction="none")
    torch.testing.assert_close(engine.losses(theta, X, y), smoothed)

    # Each row's gradient of the smoothed loss, by autograd row by row: the reference.
    def row_gradient(i: int) -> torch.Tensor:
        flat = theta.detach().requires_grad_(True)
        loss = engine.losses(flat, X[i : i + 1], y[i : i + 1]).sum()
        return torch.autograd.grad(loss, flat)[0]

    gradients = torch.stack([row_gradient(i) for i in range(len(y))])
    torch.testing.assert_close(engine.per_sample_gradients(), gradients)
    v = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scores, figures = engine.scores_and_figures(v)
    torch.testing.assert_close(scores, gradients @ v)
    torch.testing.assert_close(engine._scores_reverse(v, None, None)[0], gradients @ v)
    torch.testing.assert_close(engine.weighted_gradient(torch.ones(len(y))), gradients.sum(0))
    # The figures a report and the guard read stay the plain cross-entropy.
    torch.testing.assert_close(figures[:, 0], plain)
    # H v: the Hessian of the smoothed objective.
    flat = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(engine.objective(flat), flat, create_graph=True)
    (expected,) = torch.autograd.grad(g.dot(v), flat)
    torch.testing.assert_close(engine.hvp(v), expected)


def test_a_model_trained_with_smoothing_is_a_minimum_of_the_smoothed_loss_alone() -> None:
    """Full-batch training to convergence with smoothing: the engine's objective with the
    same smoothing has no gradient left there; the plain one does (the influence of a row
    is taken from the loss the weights minimise)."""
    torch.manual_seed(0)
    net, (X, y) = torch.nn.Linear(3, 3).double(), _data()  # convex: LBFGS finds the minimum
    optimizer = torch.optim.LBFGS(
        net.parameters(), max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(X), y, label_smoothing=SMOOTH)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)

    def slope(smoothing: float) -> float:
        engine = InfluenceModel(net, X, y, label_smoothing=smoothing)
        flat = engine.theta.detach().requires_grad_(True)
        return float(torch.autograd.grad(engine.objective(flat), flat)[0].norm())

    assert slope(SMOOTH) < 1e-4 < 1e-2 < slope(0.0)


def test_smoothing_is_recorded_trained_with_and_retrained_with(
    data_dir: Path, tmp_path: Path
) -> None:
    smooth = assert_recipe_setting(
        data_dir / "radial.csv", tmp_path, "--label-smoothing", "0.1", "label_smoothing"
    )
    for method in ("puma", "scrub"):
        out = tmp_path / f"{method}.safetensors"
        marked = tmp_path / "ids.txt"
        report = run_json("remove", "-m", smooth, "--marked", marked, "--method", method, "-o", out)
        assert report["removed"] > 0
        assert run_json("info", out)["recipe"]["label_smoothing"] == 0.1


def test_import_records_the_smoothing_the_weights_were_trained_with(
    data_dir: Path, tmp_path: Path
) -> None:
    trained = tmp_path / "t.safetensors"
    run_json("train", data_dir / "radial.csv", "--hidden", "8", "--epochs", "5", "-o", trained)
    weights = tmp_path / "w.safetensors"
    save_file(load_checkpoint(trained).model.net.state_dict(), str(weights))
    out = tmp_path / "m.safetensors"
    run_json(
        "import", weights, "--arch", "mlp", "--hidden", "8", "--data", data_dir / "radial.csv",
        "--label-smoothing", "0.1", "-o", out,
    )  # fmt: skip
    assert run_json("info", out)["recipe"]["label_smoothing"] == 0.1


@pytest.mark.parametrize("value", ["-0.1", "1", "nan"])
def test_a_smoothing_outside_0_to_1_is_refused(data_dir: Path, tmp_path: Path, value: str) -> None:
    out = tmp_path / "m.safetensors"
    result = run(
        "train", data_dir / "radial.csv", "--label-smoothing", value, "-o", out, "--epochs", "1"
    )
    assert_clean_error(result, f"--label-smoothing {value}")
    assert not out.exists()
