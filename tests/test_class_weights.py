"""Class-weighted cross-entropy (`--class-weight`): recorded as numbers, trained and
retrained with, and the loss the engine differentiates (J, its Hessian, the GGN, the
scores by either route, K-FAC's factors), against torch's weighted cross-entropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clean_error, run, run_json
from torch import nn

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.factor_fitting import fit_kronecker
from puma_cli.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CREDIT = ROOT / "sample_data" / "german-credit-train.csv"  # 490 of class 0, 210 of class 1
CREDIT_TEST = ROOT / "sample_data" / "german-credit-test.csv"
WEIGHTS = (1.0, 3.0, 0.5)


def _engine(class_weights: tuple[float, ...] = WEIGHTS) -> InfluenceModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    X = torch.randn(9, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    return InfluenceModel(net, X, y, weight_decay=0.01, class_weights=class_weights)


def test_j_is_torchs_weighted_mean_and_its_derivatives_follow() -> None:
    engine = _engine()
    w = torch.tensor(WEIGHTS, dtype=torch.float64)

    def weighted(flat: torch.Tensor) -> torch.Tensor:
        logits = engine.logits(flat, engine.X)
        return F.cross_entropy(logits, engine.y, weight=w) + 0.005 * flat.dot(flat)

    theta = engine.theta
    assert torch.allclose(engine.objective(theta), weighted(theta), atol=1e-14)
    v = torch.randn(engine.n_parameters, dtype=torch.float64)
    H = torch.autograd.functional.hessian(weighted, theta)
    assert torch.allclose(engine.hvp(v), H @ v, atol=1e-12)
    # The GGN: mean_i w_i J_i^T (diag(p_i) - p_i p_i^T) J_i, the weights scaled to mean 1.
    scale = w[engine.y]
    scale = scale / scale.mean()
    G = torch.zeros(engine.n_parameters, engine.n_parameters, dtype=torch.float64)
    for i in range(engine.n):
        J = torch.autograd.functional.jacobian(
            lambda t, i=i: engine.logits(t, engine.X[i : i + 1])[0], theta
        )
        p = torch.softmax(engine.logits(theta, engine.X[i : i + 1])[0], 0)
        G += scale[i] * J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    G = G / engine.n + 0.01 * torch.eye(engine.n_parameters, dtype=torch.float64)
    assert torch.allclose(engine.ggn_vp(v), G @ v, atol=1e-12)
    # The scores, g_i . v of each row's weighted loss, by the forward and reverse routes.
    per_row = engine.per_sample_gradients()
    expected = per_row @ v
    assert torch.allclose(per_row.mean(0) + 0.01 * theta, torch.func.grad(weighted)(theta))
    assert torch.allclose(engine.directional_derivatives(v), expected, atol=1e-12)
    reverse, _ = engine._scores_reverse(v, None, None)
    assert torch.allclose(reverse, expected, atol=1e-12)
    plain = _engine(())
    assert not torch.allclose(plain.directional_derivatives(v), expected, atol=1e-6)


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_factors_take_each_rows_class_weight(kind: str, fisher: str) -> None:
    """On one row, the weighted fit is the class's weight times the plain one (K-FAC is
    exact there), for the exact Fisher and the sampled one (same seed, same labels)."""
    torch.manual_seed(1)
    net = nn.Linear(4, 3).double()
    X, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in net.parameters()]
    eye = torch.eye(sum(sizes), dtype=torch.float64)
    dense = []
    for weight in (None, torch.tensor(WEIGHTS, dtype=torch.float64)):
        curvature = fit_kronecker(kind, net, names, sizes, [(X, y)], fisher, 3, None, weight)
        dense.append(torch.stack([curvature.matvec(e) for e in eye]))
    assert dense[0].abs().max() > 1e-3
    assert torch.allclose(dense[1], WEIGHTS[1] * dense[0], atol=1e-12)


def test_class_weights_through_train_remove_retrain_and_import(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    out = run_json(
        "train", CREDIT, "--test", CREDIT_TEST, "--class-weight", "balanced", "--epochs", "20",
        "--device", "cpu", "-o", model,
    )  # fmt: skip
    weights = run_json("info", model)["recipe"]["class_weights"]
    # scikit-learn's balanced weights over the 630 trained rows (the stratified 10 % held
    # out): n / (K x count), 441 and 189 of them.
    assert weights == pytest.approx([630 / (2 * 441), 630 / (2 * 189)])
    assert "class_weights=0.714286,1.66667," in run("info", model).stdout.replace("\n", " ")
    assert out["test_accuracy"] > 0.6
    ids = tmp_path / "ids.txt"
    run_json("mark", CREDIT, "--random", "0.03", "-o", ids)
    for curvature in ("exact", "ggn", "kfac", "ekfac"):
        removed = run_json(
            "remove", "-m", model, "--marked", ids, "--curvature", curvature,
            "-o", tmp_path / f"r-{curvature}.safetensors",
        )  # fmt: skip
        assert removed["marked_loss_after"] >= removed["marked_loss_before"] - 1e-6, curvature
    retrained = tmp_path / "rt.safetensors"
    run_json("remove", "-m", model, "--marked", ids, "--method", "retrain", "-o", retrained)
    assert run_json("info", retrained)["recipe"]["class_weights"] == weights
    plain = tmp_path / "plain.safetensors"
    run_json("train", CREDIT, "--epochs", "20", "--device", "cpu", "-o", plain)
    assert "class_weights" not in run_json("info", plain)["recipe"]
    # The weights change what is learnt: the minority class is predicted more often.
    table = np.loadtxt(CREDIT, delimiter=",", skiprows=1)
    X = torch.as_tensor(table[:, 1:-1], dtype=torch.float32)  # id first, label last
    with torch.no_grad():
        share = [
            float((load_checkpoint(m).model(X).argmax(1) == 1).float().mean())
            for m in (model, plain)
        ]
    assert share[0] > share[1], share
    exported = tmp_path / "w.safetensors"
    run_json("export", plain, "-o", exported)
    imported = tmp_path / "i.safetensors"
    run_json(
        "import", exported, "--arch", "mlp", "--data", CREDIT, "--class-weight", "1,2.5",
        "-o", imported,
    )  # fmt: skip
    assert run_json("info", imported)["recipe"]["class_weights"] == [1.0, 2.5]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("1,2,3", "--class-weight gives 3 weights for 2 classes; give one a class"),
        ("1,-2", "--class-weight 1,-2: give positive numbers, one a class, or balanced"),
        ("1,nan", "give positive numbers"),
        ("heavy", "--class-weight 'heavy': give balanced, or numbers separated by commas"),
    ],
)
def test_bad_class_weights_are_one_clear_error(given: str, message: str, tmp_path: Path) -> None:
    result = run("train", CREDIT, "--class-weight", given, "-o", tmp_path / "m.safetensors")
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []
