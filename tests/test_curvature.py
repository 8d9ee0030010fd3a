"""Curvature backends against float64 references: the GGN product equals J^T H J, K-FAC and
EK-FAC equal the exact GGN where they must (one row, one linear layer) and curvlinops'
own operators elsewhere, their closed-form inverse inverts; and every backend through
`puma remove`."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, rewrite_tensor, run, run_json
from safetensors.torch import load_file
from torch import nn

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.factor_fitting import fit_kronecker, kronecker_from_tensors
from puma_cli.engine.solvers import solve
from puma_cli.errors import PumaError


def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    middle: list[nn.Module] = [nn.BatchNorm1d(4)] if bn else []
    net = nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 3)).double()
    return net.eval()


def _layout(net: nn.Module) -> tuple[list[str], list[int]]:
    return [n for n, _ in net.named_parameters()], [p.numel() for p in net.parameters()]


def _dense(matvec, size: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    eye = torch.eye(size, dtype=torch.float64)
    return torch.stack([matvec(eye[i]) for i in range(size)], dim=1)


def test_the_ggn_product_is_j_transpose_h_j() -> None:
    net = _mlp()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    engine = InfluenceModel(net, X, y, weight_decay=0.01)
    G = torch.zeros(engine.n_parameters, engine.n_parameters, dtype=torch.float64)
    for i in range(6):
        J = torch.autograd.functional.jacobian(
            lambda t, i=i: engine.logits(t, X[i : i + 1])[0], engine.theta
        )
        p = torch.softmax(engine.logits(engine.theta, X[i : i + 1])[0], 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    G = G / 6 + 0.01 * torch.eye(engine.n_parameters, dtype=torch.float64)
    dense = _dense(engine.ggn_vp, engine.n_parameters)
    assert torch.allclose(dense, G, atol=1e-12)
    assert float(torch.linalg.eigvalsh(dense).min()) > 0  # PSD (here PD with the decay)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_equals_the_exact_ggn_on_one_row_of_a_linear_model(kind: str) -> None:
    torch.manual_seed(1)
    net = nn.Linear(4, 3).double()
    X = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    engine = InfluenceModel(net, X, y)
    curvature = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    exact = _dense(engine.ggn_vp, engine.n_parameters)
    assert torch.allclose(_dense(curvature.matvec, engine.n_parameters), exact, atol=1e-12)
    assert curvature.uncovered == 0


def _no_bias(seed: int) -> nn.Module:
    """A layer without a bias (ResNet-18's and DenseNet's convolutions have none), one with."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double().eval()


class _PooledConv(nn.Module):
    """One convolution, then the mean over positions: linear in its weights, one loss per
    image (the setting of a classifier), the weights shared over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_is_exact_on_one_image_of_a_pooled_convolution(kind: str) -> None:
    """K-FAC-reduce (Eschenhagen et al. 2023), the approximation used for shared weights,
    is the exact GGN of one image through a linear convolution and pooling; K-FAC-expand,
    curvlinops' default, is not (it treats every position as its own example)."""
    torch.manual_seed(4)
    net = _PooledConv().double().eval()
    X = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([1])
    engine = InfluenceModel(net, X, y)
    exact = _dense(engine.ggn_vp, engine.n_parameters)
    curvature = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    assert torch.allclose(_dense(curvature.matvec, engine.n_parameters), exact, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from curvlinops import KFACLinearOperator

        expand = KFACLinearOperator(
            net, nn.CrossEntropyLoss(), list(net.parameters()), [(X, y)], fisher_type="type-2",
            separate_weight_and_bias=False, check_deterministic=False,
        )  # fmt: skip
    dense_expand = expand @ torch.eye(engine.n_parameters, dtype=torch.float64)
    assert not torch.allclose(dense_expand, exact, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_our_closed_form_blocks_match_curvlinops_and_invert(kind: str, bias: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from curvlinops import EKFACLinearOperator, KFACLinearOperator
    net = _mlp(2) if bias else _no_bias(2)
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    batches = [(X[:8], y[:8]), (X[8:], y[8:])]
    reference_class = EKFACLinearOperator if kind == "ekfac" else KFACLinearOperator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_class(
            net, nn.CrossEntropyLoss(), list(net.parameters()), batches, fisher_type="type-2",
            separate_weight_and_bias=False, check_deterministic=False,
        )  # fmt: skip
    curvature = fit_kronecker(kind, net, *_layout(net), batches, fisher="type-2")
    v = torch.randn(curvature.size, dtype=torch.float64)
    assert torch.allclose(curvature.matvec(v), reference @ v, atol=1e-12)
    b = curvature.matvec(v) + 0.05 * v
    assert torch.allclose(curvature.inverse(b, 0.05), v, atol=1e-10)
    # Positive semi-definite, as the GGN it approximates.
    for w in torch.randn(10, curvature.size, dtype=torch.float64):
        assert float(w.dot(curvature.matvec(w))) >= -1e-12


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("net_name", ["wide", "conv"])
def test_inverse_norms_are_each_row_dotted_with_its_inverse(kind: str, net_name: str) -> None:
    """g (C + mu I)^-1 g for a batch of rows (self-influence's), against `inverse` a row at
    a time: a layer whose basis holds only its inputs' range (mu alone on the rest), a
    BatchNorm left out, and a convolution shared over positions."""
    torch.manual_seed(2)
    if net_name == "wide":
        net = nn.Sequential(
            nn.Linear(1100, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)
        ).double().eval()  # fmt: skip
        X = torch.randn(20, 1100, dtype=torch.float64)
        y = torch.randint(0, 3, (20,))
    else:
        net = _PooledConv().double().eval()
        X = torch.randn(6, 2, 5, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
    curvature = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    if net_name == "wide":
        assert curvature.uncovered == 8
        assert any(b.Qa.shape[1] < b.Qa.shape[0] for b in curvature.blocks)
    rows = torch.randn(5, curvature.size, dtype=torch.float64)
    expected = torch.stack([row.dot(curvature.inverse(row, 0.3)) for row in rows])
    torch.testing.assert_close(curvature.inverse_norms(rows, 0.3), expected)
    # A float32 engine's rows are rotated in float32, their squares summed in float64.
    single = rows.float()
    expected = torch.stack([row.dot(curvature.inverse(row, 0.3)) for row in single.double()])
    norms = curvature.inverse_norms(single, 0.3)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0.0)


def test_parameters_outside_linear_and_conv_layers_are_left_unchanged() -> None:
    net = _mlp(3, bn=True)
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    curvature = fit_kronecker("kfac", net, *_layout(net), [(X, y)], fisher="type-2")
    assert curvature.uncovered == 8  # BatchNorm1d(4): weight and bias
    assert curvature.left_out == {"BatchNorm1d": 8}
    tensors = curvature.to_tensors()  # the cached factors name the same layers
    again = kronecker_from_tensors("kfac", net, *_layout(net), tensors, X[:2])
    assert again is not None and again.left_out == {"BatchNorm1d": 8}
    b = torch.randn(curvature.size, dtype=torch.float64)
    x = curvature.inverse(b, 0.5)
    assert torch.equal(x[~curvature.covered], torch.zeros_like(x[~curvature.covered]))
    assert x[curvature.covered].abs().sum() > 0


def test_cg_on_the_ggn_agrees_with_a_dense_solve() -> None:
    net = _mlp(4)
    X = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    engine = InfluenceModel(net, X, y)
    engine.curvature = "ggn"
    b = torch.randn(engine.n_parameters, dtype=torch.float64)
    G = _dense(engine.ggn_vp, engine.n_parameters)
    top = float(torch.linalg.eigvalsh(G).max())
    result = solve(engine, b, "cg", 0.01, top, tol=1e-10, max_iter=500)
    expected = torch.linalg.solve(
        G + 0.01 * top * torch.eye(engine.n_parameters, dtype=torch.float64), b
    )
    assert torch.allclose(result.x, expected, atol=1e-6 * float(expected.norm()))


@pytest.fixture
def copy(model_file: Path, data_dir: Path, tmp_path: Path) -> Path:
    shutil.copy(model_file, tmp_path / "m.safetensors")
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:13]
    (tmp_path / "ids.txt").write_text("".join(r.split(",", 1)[0] + "\n" for r in rows))
    return tmp_path


def _remove(folder: Path, out: str, *extra: str) -> dict:
    return run_json(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
        "-o", folder / out, "--device", "cpu", "--overwrite", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("curvature", ["exact", "ggn", "kfac", "ekfac"])
def test_every_curvature_removes_through_the_cli(copy: Path, curvature: str) -> None:
    out = _remove(copy, "r.safetensors", "--curvature", curvature)
    assert out["parameters"]["curvature"] == curvature
    assert out["marked_loss_after"] > out["marked_loss_before"]
    assert out["test_accuracy_after"] >= out["test_accuracy_before"] - 0.05


def test_auto_is_exact_for_the_papers_models(copy: Path) -> None:
    assert _remove(copy, "r.safetensors")["parameters"]["curvature"] == "exact"


def test_multiply_adds_count_each_position_a_weight_is_used_at() -> None:
    from puma_cli.engine.curvature import multiply_adds

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8 x 10 x 10 outputs of 3 x 3 x 3 each: 21,600
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 800 of 1 x 3 x 3: 7,200
        nn.Flatten(2),
        nn.Linear(100, 6),  # on 8 "tokens" of 100: 8 x 6 x 100 = 4,800
    )
    assert multiply_adds(net, torch.randn(1, 3, 10, 10)) == 21_600 + 7_200 + 4_800
    assert multiply_adds(nn.Tanh(), torch.randn(1, 3)) == 0


def test_auto_counts_a_rows_work_not_its_parameters() -> None:
    from puma_cli.engine.curvature import AUTO_EXACT_MAX, resolve_curvature

    rows = 1_000
    small = AUTO_EXACT_MAX // rows  # parameters x rows at the threshold
    assert resolve_curvature("auto", small, rows, 10, 0).name == "exact"
    assert resolve_curvature("auto", small + 1, rows, 10, 0).name == "kfac"
    # A convolution's few weights used at every position: its work decides, not its size.
    assert resolve_curvature("auto", 330, rows, 10, 0, work_per_row=small + 1).name == "kfac"
    # An embedding's many weights, few used a row: its size still counts.
    assert resolve_curvature("auto", small + 1, rows, 10, 0, work_per_row=50).name == "kfac"
    assert resolve_curvature("exact", 330, rows, 10, 0, work_per_row=10**9).name == "exact"
    # Nothing K-FAC can fit: the GGN (every parameter, no second derivatives), with a note.
    unfit = resolve_curvature("auto", small + 1, rows, 10, 0, kronecker_fits=False)
    assert unfit.name == "ggn" and "no Linear or Conv2d layer" in unfit.note
    assert resolve_curvature("auto", small, rows, 10, 0, kronecker_fits=False).name == "exact"
    assert resolve_curvature("auto", small + 1, rows, 10, 0).note == ""


def test_the_exact_fisher_is_fitted_where_it_is_cheap_only() -> None:
    from puma_cli.engine.curvature import resolve_curvature

    def fisher(rows: int, classes: int, parameters: int = 64_106) -> str:
        return resolve_curvature("kfac", parameters, rows, classes, 0).fisher

    assert fisher(1_166, 10, 13_706) == "type-2"  # the digits CNN: 11,660 rows x classes
    assert fisher(9_000, 2) == "type-2"
    assert fisher(9_000, 10) == "mc"  # one backward pass a batch, not ten
    assert fisher(1_000, 10, 200_000) == "mc"
    # weighed against training too: its rows x classes at most a quarter of its passes
    from puma_cli.engine.curvature import resolve_curvature as resolve

    assert resolve("kfac", 13_706, 1_166, 10, 0, epochs=20).fisher == "type-2"  # 0.17
    assert resolve("kfac", 28_666, 2_250, 10, 2_000, epochs=3).fisher == "mc"  # 0.99
    assert resolve("kfac", 41_722, 2_250, 10, 2_000, epochs=8).fisher == "mc"  # 0.37
    assert resolve("kfac", 41_722, 2_250, 10, 2_000, epochs=12).fisher == "type-2"  # 0.247
    assert resolve("kfac", 41_722, 2_250, 10, 2_000, epochs=0).fisher == "type-2"  # unknown


POSITIONAL_NET = """
from torch import nn


class Net(nn.Module):  # 330 weights; the convolution's are used at all 64 positions of 8 x 8
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes),
        )

    def forward(self, x):
        return self.body(x)
"""


MIXER_NET = """
import torch
from torch import nn


class Mixer(nn.Module):  # an MLP-Mixer block: tokens mixed over LayerNorm'd channels
    def __init__(self, input_shape, n_classes, dim=8):
        super().__init__()
        self.tokens = input_shape[0]
        self.embed = nn.Linear(input_shape[1], dim)
        self.norm = nn.LayerNorm(dim)
        self.token_in = nn.Linear(self.tokens, 12)
        self.token_out = nn.Linear(12, self.tokens)
        self.channel = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_classes))

    def forward(self, x):
        x = self.embed(x)
        mixed = self.token_out(torch.relu(self.token_in(self.norm(x).transpose(1, 2))))
        x = x + mixed.transpose(1, 2)
        x = x + self.channel(x)
        return self.head(x.mean(1))
"""


def _mixer(tmp_path: Path) -> nn.Module:
    (tmp_path / "mixer_net.py").write_text(MIXER_NET)
    namespace: dict = {}
    exec(compile(MIXER_NET, str(tmp_path / "mixer_net.py"), "exec"), namespace)
    torch.manual_seed(0)
    return namespace["Mixer"]((6, 5), 3).eval()


def test_a_layer_whose_reduce_factors_hold_no_curvature_is_fitted_as_expand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Mixer's token-mixing output layer (its positions LayerNorm'd channels, over which
    its output gradients sum to 0: every path on runs through a LayerNorm over them)
    holds almost none of its curvature as K-FAC-reduce: it is fitted as expand, its block
    then the one an all-expand fit gives, and every other layer's the all-reduce fit's.
    (The layer before it, whose inputs average to LayerNorm's mean, 0 at its start, keeps
    its bias's share: between 0.05 and 0.1 here, 0.018-0.031 in a trained Mixer.)"""
    from puma_cli.engine import factor_fitting, factor_layers, kronecker

    net = _mixer(tmp_path)
    X, y = torch.randn(40, 6, 5), torch.randint(0, 3, (40,))
    probed = factor_layers.probed_layers(net, X[:2])
    assert {name: at for name, _, at in probed} == {
        "embed": 6, "token_in": 8, "token_out": 8, "channel.1": 6, "head.1": 1
    }  # fmt: skip
    assert factor_layers.expanded_layers(net, probed, X, seed=0) == {"token_out"}
    mixed = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    assert mixed.expanded == {"token_out"}
    below = factor_layers.EXPAND_BELOW
    monkeypatch.setattr(factor_layers, "EXPAND_BELOW", 0.0)  # reduce everywhere
    reduce = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    monkeypatch.setattr(factor_fitting, "APPROXIMATION", "expand")  # expand everywhere
    expand = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    assert reduce.expanded == expand.expanded == frozenset()
    v = torch.randn(mixed.size, dtype=torch.float64)
    for block in mixed.blocks:
        inside = torch.zeros_like(v)
        block.place(inside, block.matrix(v))  # v on this layer alone
        own = mixed.matvec(inside)
        expanded = block.module in mixed.expanded
        same, other = (expand, reduce) if expanded else (reduce, expand)
        torch.testing.assert_close(own, same.matvec(inside), rtol=1e-4, atol=1e-6 * own.norm())
        if block.module != "head.1":  # one position a row: the two are the same
            assert not torch.allclose(own, other.matvec(inside), rtol=1e-2), block.module
    # the fitted factors themselves: reduce's token_out block holds a sliver of expand's

    def trace(k: kronecker.KroneckerCurvature, name: str) -> float:
        return float(next(b for b in k.blocks if b.module == name).E.sum())

    assert trace(reduce, "token_out") < 1e-6 * trace(expand, "token_out")  # 6e-15 against 0.79
    assert trace(reduce, "channel.1") > below * trace(expand, "channel.1")


def test_a_convolution_fitted_as_expand_is_curvlinops_expand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Convolutions (with and without a bias) taken as expand: their blocks are those of
    curvlinops' K-FAC-expand fit, the head's (one position a row) the same in both."""
    from puma_cli.engine import factor_fitting, factor_layers

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()  # fmt: skip
    X, y = torch.randn(40, 3, 8, 8), torch.randint(0, 3, (40,))
    monkeypatch.setattr(factor_layers, "EXPAND_BELOW", 10.0)  # every shared layer
    mixed = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    assert mixed.expanded == {"0", "2"}
    monkeypatch.setattr(factor_fitting, "APPROXIMATION", "expand")
    expand = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    v = torch.randn(mixed.size, dtype=torch.float64)
    torch.testing.assert_close(mixed.matvec(v), expand.matvec(v))


class _TwiceConv(nn.Module):
    """One convolution applied to each half of the image: two calls a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = (self.conv(half).mean((2, 3)) for half in x.chunk(2, dim=3))
        return self.head(torch.cat([left, right], dim=1))


def test_a_layer_called_twice_is_probed_over_both_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe pairs each call's input with its gradient (the backward pass meets them in
    reverse) and sums the traces over the calls; as expand, the block is curvlinops'."""
    from puma_cli.engine import factor_fitting, factor_layers

    torch.manual_seed(0)
    net = _TwiceConv().eval()
    X, y = torch.randn(30, 3, 6, 8), torch.randint(0, 3, (30,))
    probed = factor_layers.probed_layers(net, X[:2])
    assert factor_layers.expanded_layers(net, probed, X, seed=0) == frozenset()
    monkeypatch.setattr(factor_layers, "EXPAND_BELOW", 10.0)
    assert factor_layers.expanded_layers(net, probed, X, seed=0) == {"conv"}
    mixed = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    monkeypatch.setattr(factor_fitting, "APPROXIMATION", "expand")
    expand = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "type-2")
    v = torch.randn(mixed.size, dtype=torch.float64)
    torch.testing.assert_close(mixed.matvec(v), expand.matvec(v))


def test_a_layer_another_process_fits_as_expand_is_expanded_here_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun every process probes the same rows, and their votes are summed: a
    layer any process picks (its rounding on the threshold, say) is expand on all."""
    from puma_cli import parallel
    from puma_cli.engine import factor_layers

    torch.manual_seed(0)
    net = _TwiceConv().eval()
    X = torch.randn(30, 3, 6, 8)
    probed = factor_layers.probed_layers(net, X[:2])
    assert factor_layers.expanded_layers(net, probed, X, seed=0) == frozenset()
    monkeypatch.setattr(parallel, "all_reduce", lambda votes: votes.add_(1))  # a peer's vote
    assert factor_layers.expanded_layers(net, probed, X, seed=0) == {"conv"}


@pytest.mark.parametrize("positions", [3, 40])  # the Gram route; each row's own gradient
def test_a_shared_layer_s_traces_are_its_rows_gradients(positions: int) -> None:
    from puma_cli.engine.factor_layers import layer_traces

    torch.manual_seed(0)
    a, g = torch.randn(5, positions, 7, dtype=torch.float64), torch.randn(5, positions, 6)
    g = g.double()
    true, reduce = layer_traces(a, g)
    rows = [g[n].T @ a[n] for n in range(5)]  # each row's gradient at the weight
    assert true == pytest.approx(sum(float((G**2).sum()) for G in rows), rel=1e-12)
    A = sum(torch.outer(a[n].mean(0), a[n].mean(0)) for n in range(5)) / 5
    B = sum(torch.outer(g[n].sum(0), g[n].sum(0)) for n in range(5))
    assert reduce == pytest.approx(float(torch.trace(A) * torch.trace(B)), rel=1e-12)


def test_the_layers_fitted_as_expand_are_reported_also_from_the_cache(tmp_path: Path) -> None:
    """Through `remove`: the report names the layers fitted as expand, and so does a second
    request that reads the factors from the cache."""
    (tmp_path / "mixer_net.py").write_text(MIXER_NET)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 6, 5)).astype(np.float32)
    np.savez(tmp_path / "seq.npz", X=X, y=(X[:, :, 0].sum(axis=1) > 0).astype(np.int64))
    model = tmp_path / "m.safetensors"
    run_json("train", tmp_path / "seq.npz", "--arch", f"{tmp_path / 'mixer_net.py'}:Mixer",
             "--epochs", "3", "-o", model, "--device", "cpu")  # fmt: skip
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in range(0, 240, 30)))
    reports = [
        run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", "kfac",
                 "-o", tmp_path / f"{name}.safetensors", "--device", "cpu")["parameters"]
        for name in ("a", "b")
    ]  # fmt: skip
    assert [r["curvature_cached"] for r in reports] == [False, True]
    expanded = reports[0]["expanded_layers"]
    assert "net.token_out" in expanded and reports[1]["expanded_layers"] == expanded
    assert not {"net.embed", "net.channel.1", "net.head.1"} & set(expanded)


def test_auto_takes_kfac_for_a_small_convolutional_net_on_a_small_set(tmp_path: Path) -> None:
    """330 parameters x 1,295 digits is far below the threshold, but its 9,400 multiply-adds
    a row are past it: the exact Hessian's products there cost a retrain each few."""
    arch = tmp_path / "net.py"
    arch.write_text(POSITIONAL_NET)
    model = tmp_path / "m.safetensors"
    digits = Path(__file__).resolve().parent.parent / "sample_data"
    trained = run_json(
        "train", digits / "digits-train.npz", "--arch", f"{arch}:Net", "-o", model,
        "--epochs", "2", "--lr", "0.01", "--device", "cpu",
    )  # fmt: skip
    assert trained["n_parameters"] == 330
    with np.load(digits / "digits-train.npz") as data:
        (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in data["ids"][:10]))
    out = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o", tmp_path / "r.safetensors",
        "--device", "cpu",
    )  # fmt: skip
    assert out["parameters"]["curvature"] == "kfac"


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_factors_are_cached_and_a_damaged_cache_is_refit(copy: Path, kind: str) -> None:
    first = _remove(copy, "a.safetensors", "--curvature", kind)
    assert first["parameters"]["curvature_cached"] is False
    # fitted and decomposed in float32 (the default for factors), and cached in it
    assert {t.dtype for t in load_file(str(copy / "m.factors.safetensors")).values()} == {
        torch.float32
    }
    (copy / "m.influence.safetensors").unlink()  # so that the factors are what is reused
    second = _remove(copy, "b.safetensors", "--curvature", kind)
    assert second["parameters"]["curvature_cached"] is True
    a, b = (load_file(str(copy / f"{x}.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lossless
    (copy / "m.factors.safetensors").write_bytes(b"damaged")
    (copy / "m.influence.safetensors").unlink()
    third = _remove(copy, "c.safetensors", "--curvature", kind)
    assert third["parameters"]["curvature_cached"] is False
    assert any("m.factors.safetensors is unreadable" in w for w in third["warnings"])


@pytest.mark.parametrize(
    ("part", "value"), [("Qa", float("nan")), ("Qb", float("inf")), ("E", -1.0)]
)
def test_cached_factors_with_one_bad_value_are_refit(copy: Path, part: str, value: float) -> None:
    """One NaN, inf or negative eigenvalue anywhere in the cached factors refits them."""
    first = _remove(copy, "a.safetensors", "--curvature", "kfac")
    cache = copy / "m.factors.safetensors"
    name = next(k for k in sorted(load_file(str(cache))) if k.endswith(f".{part}"))

    def one_bad(tensor: torch.Tensor) -> torch.Tensor:
        bad = tensor.clone()
        bad.view(-1)[bad.numel() // 2] = value
        return bad

    rewrite_tensor(cache, name, one_bad)
    (copy / "m.influence.safetensors").unlink()  # so that the factors are what is read
    second = _remove(copy, "b.safetensors", "--curvature", "kfac")
    assert second["parameters"]["curvature_cached"] is False
    assert any("does not hold factors for this model's layers" in w for w in second["warnings"])
    a, b = (load_file(str(copy / f"{x}.safetensors")) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # refit: the cold result again
    assert first["parameters"]["curvature_cached"] is False


def test_curvature_options_are_checked(copy: Path) -> None:
    result = run(
        "remove", "-m", copy / "m.safetensors", "--marked", copy / "ids.txt",
        "--curvature-samples", "-1",
    )  # fmt: skip
    assert_clean_error(result, "--curvature-samples -1 is out of range")
    bogus = run("remove", "-m", copy / "m.safetensors", "--marked", copy / "ids.txt",
                "--curvature", "hessian-free")  # fmt: skip
    assert bogus.exit_code == 2  # not a choice: a usage error
    assert sorted(p.name for p in copy.iterdir()) == ["ids.txt", "m.safetensors"]


def test_auto_precision_is_float64_for_small_dense_nets_only() -> None:
    from puma_cli.engine.training_engine import derivative_dtype
    from puma_cli.io.checkpoint import Checkpoint
    from puma_cli.models.architectures import Architecture, build_model

    def dtype_for(arch: Architecture) -> torch.dtype:
        checkpoint = Checkpoint(build_model(arch), {}, {}, np.zeros(0, np.uint8), ())
        return derivative_dtype(checkpoint, "auto")

    assert dtype_for(Architecture("mlp", (20,), 10, (64,))) == torch.float64
    assert dtype_for(Architecture("mlp", (200,), 10, (1024, 768))) == torch.float32
    assert dtype_for(Architecture("cnn", (1, 8, 8), 10, (64,))) == torch.float32


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_factors_fitted_in_float32_match_float64(kind: str) -> None:
    """A float64 engine fits its factors in float32 unless float64 is asked for: the same
    curvature to float32 accuracy; the float64 factors, summed over ten batches of 128 rows
    (the last short), equal one fit over every row."""
    from puma_cli.engine.curvature import CurvatureChoice, attach_curvature

    net = _mlp(3)
    X = torch.randn(1200, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (1200,))
    choice = CurvatureChoice(kind, 1200, "type-2")
    fitted = {}
    for dtype in (torch.float32, torch.float64):
        engine = InfluenceModel(net, X, y, weight_decay=0.0)
        attach_curvature(engine, choice, {}, 0, None, dtype)
        assert engine.kronecker is not None and not engine.kronecker_cached
        fitted[dtype] = engine.kronecker
    whole = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    v = torch.randn(whole.size, dtype=torch.float64)
    exact = whole.inverse(v, 0.1)
    torch.testing.assert_close(fitted[torch.float64].inverse(v, 0.1), exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fitted[torch.float32].inverse(v, 0.1), exact, rtol=1e-4, atol=1e-6)
    assert next(engine.module.parameters()).dtype == torch.float64  # the engine is untouched


class _Unusual(nn.Module):
    """off-input: a layer whose output does not depend on the input (a learnt class prior
    through a Linear) beside one that does; in-place: a forward that writes into its input
    (the prior then takes a row of the input)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.prior = nn.Linear(2, 3)
        self.code = nn.Parameter(torch.randn(2))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model == "in-place":
            x.mul_(0.5)
            return self.body(x.tanh()) + self.prior(x[:, :2] * self.code)
        return self.body(x.tanh()) + self.prior(self.code.expand(x.shape[0], -1))


class _Fresh:
    """One batch, given afresh on every pass over the data (a forward that writes into
    its input would otherwise change it for curvlinops' next pass)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield self.X.clone(), self.y


@pytest.mark.parametrize("model", ["mlp", "off-input", "in-place"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_factors_taken_through_the_input_equal_curvlinops_or_fall_back(
    kind: str, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit backpropagates to the input, not the weights, also where the forward
    writes into its input; where a layer's output does not depend on the input, it takes
    the weights' path. Each equals curvlinops' own operator, and leaves no hook behind."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from curvlinops import EKFACLinearOperator, KFACLinearOperator
    torch.manual_seed(4)
    net = _mlp(4) if model == "mlp" else _Unusual(model).double()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    reference_class = EKFACLinearOperator if kind == "ekfac" else KFACLinearOperator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_class(
            net, nn.CrossEntropyLoss(), params, _Fresh(X, y), fisher_type="type-2",
            separate_weight_and_bias=False, check_deterministic=False,
        )  # fmt: skip
    targets: list[tuple[int, ...]] = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, **kwargs):  # type: ignore[no-untyped-def]
        targets.append(tuple(inputs[0].shape))
        return grad(outputs, inputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    curvature = fit_kronecker(kind, net, *_layout(net), [(X.clone(), y)], fisher="type-2")
    monkeypatch.undo()
    # The last fit's backward passes went to the input (12 x 3) or, falling back, the weights.
    assert (targets[-1] == (12, 3)) == (model != "off-input")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    names = [n for n, _ in net.named_parameters()]
    covered = [i for i, (n, _) in enumerate(net.named_parameters()) if n != "code"]
    v = torch.randn(curvature.size, dtype=torch.float64)
    sizes = [p.numel() for p in net.parameters()]
    parts = list(torch.split(v, sizes))
    mine = torch.split(curvature.matvec(v), sizes)
    ours = [mine[i] for i in covered]
    theirs = reference @ torch.cat([parts[i] for i in covered if names[i] != "code"])
    assert torch.allclose(torch.cat(ours), theirs, atol=1e-12)


def test_a_layer_frozen_in_part_gets_no_block_and_its_trainable_part_is_left_out() -> None:
    net = _mlp(4)
    net[0].weight.requires_grad_(False)  # its bias still trains
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    engine = InfluenceModel(net, X, y)
    assert engine.names == ["0.bias", "2.weight", "2.bias"]  # the frozen weight is no theta
    curvature = fit_kronecker("kfac", engine.module, engine.names, engine.sizes, [(X, y)])
    assert [b.module for b in curvature.blocks] == ["2"]
    assert curvature.uncovered == 4 and curvature.left_out == {"partly frozen Linear": 4}
    x = curvature.inverse(torch.ones(curvature.size, dtype=torch.float64), 0.1)
    assert torch.equal(x[:4], torch.zeros(4, dtype=torch.float64))  # the bias stays


class _Spare(nn.Module):
    """A Linear the forward never calls (a head kept for another task): its parameters are
    in theta with no gradient, left out of K-FAC, and named as such rather than as a
    layer K-FAC does not know (the warning said "Linear ... outside the Linear layers")."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.spare = nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_a_layer_never_called_is_named_so() -> None:
    net = _Spare().double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    curvature = fit_kronecker("kfac", net, *_layout(net), [(X, y)], fisher="type-2")
    assert [b.module for b in curvature.blocks] == ["a"]
    assert curvature.left_out == {"Linear never called as a layer": 16}


def test_a_wide_factor_of_few_rows_is_decomposed_through_its_rank() -> None:
    """An input factor wider than twice the rows it is fitted on (ResNet-18's 4,608-wide
    last stage on 2,000 rows) has rank at most those rows under K-FAC-reduce: the
    eigenbasis of its range comes from a sketch of that rank, it is 0 on the rest, and
    the damped inverse is the float64 eigendecomposition's, nearer than a float32 eigh."""
    from puma_cli.engine.kronecker import LOW_RANK_MIN, OVERSAMPLE, decompose

    torch.manual_seed(0)
    d, rows = LOW_RANK_MIN + 100, 300
    patches = torch.randn(rows, d) * torch.logspace(0, -3, d)  # a decaying spectrum
    factor = patches.T @ patches / rows
    values, vectors = decompose(factor, rows)
    k = rows + OVERSAMPLE  # the range alone: the factor is 0 on the rest
    assert values.shape == (k,) and vectors.shape == (d, k)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k), atol=1e-5, rtol=0)
    exact_values, exact_vectors = torch.linalg.eigh(factor.double())
    torch.testing.assert_close(values[-rows:].double(), exact_values[-rows:], atol=1e-6, rtol=1e-4)
    mu = 0.01 * float(exact_values.max())
    b = torch.randn(d, 4, dtype=torch.float64)

    def inverse(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        vectors, values = vectors.double(), values.double().clamp_min(0)
        inside = vectors.T @ b
        rest = (b - vectors @ inside) / mu  # 0 where the basis is complete
        return vectors @ (inside / (values + mu)[:, None]) + rest

    exact = inverse(exact_values, exact_vectors)
    error = float((inverse(values, vectors) - exact).norm() / exact.norm())
    error32 = float((inverse(*torch.linalg.eigh(factor)) - exact).norm() / exact.norm())
    assert error < 1e-5 and error <= error32, (error, error32)
    # A bound near the width, a narrow factor, or a bound the factor exceeds (a layer
    # called twice in a forward adds two vectors a row): the plain eigendecomposition.
    for wide, bound in ((factor, d // 2), (factor[:500, :500], 10), (factor, rows // 2)):
        plain = decompose(wide, bound)
        assert torch.equal(plain[0], torch.linalg.eigh(wide)[0])


class _Twice(nn.Module):
    """One Linear layer applied to each half of the row: two calls a forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        return self.layer(x[:, :half]) + self.layer(x[:, half:])


class _Tokens(nn.Module):
    """A bias-free Linear layer over 4 tokens a row (K-FAC-reduce: their mean)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.view(x.shape[0], 4, -1)).mean(dim=1)


@pytest.mark.parametrize(
    ("kind", "case"),
    [("kfac", "plain"), ("kfac", "twice"), ("kfac", "tokens"), ("ekfac", "plain"),
     ("ekfac", "twice")],
)  # fmt: skip
def test_fitted_factors_through_their_rows_invert_as_the_float64_fit(
    kind: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K-FAC of a Linear layer wider than twice its fitting rows takes its input factor
    from the rows of its inputs (never the d x d sum): its inverse is the float64 fit's
    of the whole factor, as near as the full float32 eigenbasis's; so for a layer called
    twice a forward (twice the rows) and one over tokens (their mean a row). EK-FAC
    takes its basis from the rows too, and refits its eigenvalues in it."""
    from puma_cli.engine import kronecker

    torch.manual_seed(0)
    width = kronecker.LOW_RANK_MIN + 50
    net, columns = {
        "plain": (nn.Sequential(nn.Linear(width, 3)), width),
        "twice": (_Twice(width), 2 * width),
        "tokens": (_Tokens(width), 4 * width),
    }[case]
    X, y = torch.randn(200, columns), torch.randint(0, 3, (200,))
    batches = [(X[:120], y[:120]), (X[120:], y[120:])]  # rows joined over batches
    through_rows = fit_kronecker(kind, net, *_layout(net), batches)
    monkeypatch.setattr(kronecker, "LOW_RANK_MIN", 10**9)
    full = fit_kronecker(kind, net, *_layout(net), batches)
    exact = fit_kronecker(kind, net.double(), *_layout(net), [(x.double(), t) for x, t in batches])
    assert full.from_rows == frozenset() and len(through_rows.from_rows) == 1
    v = torch.randn(full.size, dtype=torch.float64)
    top = float(full.blocks[0].E.max())
    for mu in (0.01 * top, 0.1 * top):
        reference = exact.inverse(v, mu)
        errors = [float((k.inverse(v, mu) - reference).norm() / reference.norm())
                  for k in (through_rows, full)]  # fmt: skip
        # EK-FAC's refit, squared in float32 in either basis, rounds alike (1.7e-6 and
        # 1.6e-6 where the layer is called twice)
        assert errors[0] < 1e-5 and errors[0] <= errors[1] * (1.5 if kind == "ekfac" else 1)
        # The thin basis (the rows' span alone) inverts its own product, as near as the
        # full float32 basis does (both orthonormal to float32's rounding).
        for k in (through_rows, full):
            back = k.inverse(k.matvec(v) + mu * v, mu)
            assert float((back - v).norm() / v.norm()) < 1e-4
    rows = 400 if case == "twice" else 200  # the span of the rows, no wider
    bias = 0 if case == "tokens" else 1
    assert through_rows.blocks[0].Qa.shape == (width + bias, rows)
    assert through_rows.blocks[0].E.shape == (3, rows)


def test_ekfac_sums_the_factor_of_a_wide_layer_over_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EK-FAC refits each row's gradient in the basis, and at a layer over tokens that
    gradient leaves the span of the rows' mean inputs: there the factor is summed and
    its whole eigenbasis kept (equal to the fit that never takes rows), as `through_rows`
    and the weighing before the fit say."""
    from puma_cli.engine import factor_layers, kronecker

    torch.manual_seed(0)
    width = kronecker.LOW_RANK_MIN + 50
    net = _Tokens(width)
    X, y = torch.randn(200, 4 * width), torch.randint(0, 3, (200,))
    fitted = fit_kronecker("ekfac", net, *_layout(net), [(X, y)])
    (shape,) = factor_layers.factor_shapes(net, X[:2])
    assert (shape.inputs, shape.positions) == (width, 4)
    assert not factor_layers.through_rows(shape.linear, shape.inputs, 200, "ekfac", 4)
    assert factor_layers.through_rows(shape.linear, shape.inputs, 200, "kfac", 4)
    assert fitted.from_rows == frozenset()
    assert fitted.blocks[0].Qa.shape == (width, width)  # curvlinops' whole eigenbasis
    monkeypatch.setattr(kronecker, "LOW_RANK_MIN", 10**9)
    again = fit_kronecker("ekfac", net, *_layout(net), [(X, y)])
    assert torch.equal(fitted.blocks[0].E, again.blocks[0].E)


def _wide_mlp(
    tmp_path: Path, rows: int, features: int, hidden: int, epochs: int, seed: int
) -> Path:
    """m.safetensors: an MLP trained on Gaussian rows labelled by their first features'
    sign, and ids.txt marking every 20th row."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    np.savez(tmp_path / "wide.npz", X=X, y=(X[:, :4].sum(axis=1) > 0).astype(np.int64))
    model = tmp_path / "m.safetensors"
    run_json("train", tmp_path / "wide.npz", "--hidden", str(hidden), "--epochs", str(epochs),
             "-o", model, "--device", "cpu")  # fmt: skip
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in range(0, rows, 20)))
    return model


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_wide_input_layer_keeps_its_factor_s_range_alone_through_the_cache(
    kind: str, tmp_path: Path
) -> None:
    """An MLP on 1,200 features fitted on 180 rows: its first layer's input factor keeps
    the eigenvectors of its range (180 of 1,201, taken from the rows), in the cache too;
    a removal from the cached factors writes the same model as the one that fitted them.
    EK-FAC refits its eigenvalues in that basis."""
    model = _wide_mlp(tmp_path, rows=200, features=1200, hidden=8, epochs=5, seed=0)

    def removal(name: str) -> dict:
        (tmp_path / "m.influence.safetensors").unlink(missing_ok=True)  # the factors' turn
        return run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o",
                        tmp_path / name, "--curvature", kind, "--device", "cpu")  # fmt: skip

    first = removal("a.safetensors")
    factors = load_file(str(tmp_path / "m.factors.safetensors"))
    assert first["parameters"]["curvature_cached"] is False
    # fitted on the 180 trained rows (20 are validation): their span, taken from them
    assert factors["net.layers.0.Qa"].shape == (1201, 180)
    assert factors["net.layers.0.E"].shape == (8, 180)
    # 5 epochs of an 8-wide layer on 180 rows against a 1,201-wide factor: said so
    (said,) = [w for w in first["warnings"] if "multiply-adds of training" in w]
    assert "layer 'net.layers.0' has an input factor 1,201 wide" in said
    assert "fitted on 180 rows" in said and "--curvature-samples" in said
    second = removal("b.safetensors")
    assert second["parameters"]["curvature_cached"] is True
    assert not any("multiply-adds" in w for w in second["warnings"])  # nothing fitted
    a, b = (load_file(str(tmp_path / f"{x}.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # debug-labels and calibrate, fitting the same factors again, say the same
    for command in ("debug-labels", "calibrate"):
        for cache in ("m.factors.safetensors", "m.influence.safetensors"):
            (tmp_path / cache).unlink(missing_ok=True)
        out = run_json(command, "-m", model, "--curvature", kind, "-o",
                       tmp_path / f"{command}.out", "--device", "cpu")  # fmt: skip
        assert any("has an input factor 1,201 wide" in w for w in out["warnings"]), command


class _Encoder(nn.Module):
    """Convolutions, with and without a bias, then self-attention and a bias-free head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 8, (1, 3), padding=(0, 1), bias=False)
        self.attend = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        return self.head(self.attend(tokens).mean(1))


def test_factor_shapes_read_before_fitting_are_the_fitted_ones() -> None:
    """What `auto` weighs before fitting (each layer's factor widths) is what K-FAC then
    fits: a convolution's patch and bias, a bias-free one, attention's projections."""
    from puma_cli.engine.factor_layers import factor_shapes

    torch.manual_seed(0)
    net = _Encoder().eval()
    X, y = torch.randn(24, 2, 4, 4), torch.randint(0, 3, (24,))
    shapes = factor_shapes(net, X[:2])
    fitted = fit_kronecker("kfac", net, *_layout(net), [(X, y)], "mc", 0)
    assert [(s.layer, s.inputs, s.outputs) for s in shapes] == [
        (b.module, b.Qa.shape[0], b.Qb.shape[0]) for b in fitted.blocks
    ]
    assert (shapes[0].inputs, shapes[1].inputs) == (2 * 9 + 1, 6 * 3)
    assert len(shapes) == 7  # stem, mix, attention's in and out projections, linear1 and 2, head
    assert factor_shapes(nn.Sequential(nn.LayerNorm(4)), torch.randn(2, 4)) == []


def test_factors_are_weighed_before_they_are_fitted() -> None:
    """auto takes the GGN where K-FAC's factors would cost more than AUTO_FACTOR_PASSES
    passes over the rows, or half the memory; kfac asked for by name is refused only
    where they cannot fit at all. The wide cases are the two measured ones."""
    from puma_cli.engine.curvature import CurvatureChoice, fit_bytes, weigh_factors
    from puma_cli.engine.factor_layers import FactorShape

    def shapes(features: int, hidden: int, classes: int) -> list[FactorShape]:
        return [FactorShape("net.layers.0", features + 1, hidden),
                FactorShape("net.layers.2", hidden + 1, classes)]  # fmt: skip

    def weigh(
        layers: list[FactorShape], rows: int, auto: bool = True, memory: int | None = None
    ) -> CurvatureChoice:
        size = sum(s.inputs * s.outputs for s in layers)
        return weigh_factors(CurvatureChoice("kfac", rows, "mc"), layers, auto=auto,
                             rows=rows, work_per_row=size, n_parameters=size,
                             element_size=4, memory=memory)  # fmt: skip

    # measured: K-FAC 9 s (its input factor from the rows), the GGN 27 s, training 9 s
    assert weigh(shapes(30_000, 16, 4), 1_349).name == "kfac"
    assert weigh(shapes(10_000, 64, 2), 3_600).name == "kfac"  # 23 s, the GGN 54 s
    # a QR of the rows costs 3 x rows passes over a layer `outputs` wide: a linear model
    linear = weigh([FactorShape("net.layers.0", 30_001, 2)], 10_000)
    assert linear.name == "ggn" and linear.samples == 10_000
    assert "about 16,667 passes of the model over its 10,000 rows" in linear.note
    assert "'net.layers.0' has an input factor 30,001 wide" in linear.note
    assert "3.6 GB of memory" in linear.note  # three copies of the 10,000 x 30,001 rows
    narrow = shapes(64, 64, 10)
    assert weigh(narrow, 9_000).name == "kfac"  # the benchmark's 64k MLP, its 0.06x
    # by memory alone
    need = fit_bytes(narrow, 4, 9_000, "kfac")
    assert weigh(narrow, 9_000, memory=2 * need).name == "kfac"
    assert weigh(narrow, 9_000, memory=2 * need - 1).name == "ggn"
    # asked for by name: fitted where the memory holds it, however long it takes. K-FAC
    # and EK-FAC take a wide layer's factor from its rows (0.5 GB of them), but EK-FAC
    # sums it where the layer sees tokens (18.0 GB, measured 17.3 above the process
    # when K-FAC summed it)
    wide = shapes(30_000, 16, 4)
    assert weigh(wide, 1_349, auto=False, memory=10**9).name == "kfac"
    ekfac = CurvatureChoice("ekfac", 1_349, "mc")
    tokens = [dataclasses.replace(wide[0], positions=4), wide[1]]

    def weigh_ekfac(layers: list[FactorShape], memory: int | None) -> CurvatureChoice:
        return weigh_factors(ekfac, layers, auto=False, rows=1_349, work_per_row=1,
                             n_parameters=1, element_size=4, memory=memory)  # fmt: skip

    assert weigh_ekfac(wide, 10**9) == ekfac == weigh_ekfac(tokens, None)
    with pytest.raises(PumaError, match=r"about 18\.0 GB of memory .* more than the 1\.0 GB"):
        weigh_ekfac(tokens, 10**9)
    exact = CurvatureChoice("exact", 0, "mc")
    assert weigh_factors(exact, wide, auto=True, rows=9, work_per_row=1, n_parameters=1,
                         element_size=8, memory=1) == exact  # fmt: skip


def test_auto_takes_the_ggn_for_a_wide_input_layer_and_says_why(tmp_path: Path) -> None:
    """A 4,000-feature MLP, 2 hidden, on 1,400 rows: K-FAC's 4,001-wide input factor,
    even from its rows, costs 3 x 1,260 rows / 2 outputs passes over the rows, so `auto`
    solves with the GGN and says so; asked for, K-FAC fits, and its note after the fit
    gives the cost `auto` predicted."""
    model = _wide_mlp(tmp_path, rows=1400, features=4000, hidden=2, epochs=3, seed=1)
    auto = run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o",
                    tmp_path / "a.safetensors", "--device", "cpu")  # fmt: skip
    assert auto["parameters"]["curvature"] == "ggn"
    assert not (tmp_path / "m.factors.safetensors").exists()  # nothing fitted
    (said,) = [w for w in auto["warnings"] if w.startswith("--curvature auto")]
    assert "'net.layers.0' has an input factor 4,001 wide" in said
    kfac = run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature",
                    "kfac", "-o", tmp_path / "k.safetensors", "--device", "cpu")  # fmt: skip
    assert kfac["parameters"]["curvature"] == "kfac"
    # the fit's own count (x 3 epochs' 3 passes) is the one auto made before it
    (fitted,) = [w for w in kfac["warnings"] if "multiply-adds of training" in w]
    passes = float(said.split("about ")[1].split(" passes")[0].replace(",", ""))
    times = float(fitted.split("took about ")[1].split("x the")[0])
    assert abs(passes - 9 * times) <= 9 * 0.5, (passes, times)


def test_a_kfac_fit_larger_than_memory_is_refused_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--curvature kfac whose factors would not fit in memory: one Error line naming the
    layer and the way on, before any fitting, nothing written."""
    from puma_cli.engine import training_engine

    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 300)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=X, y=(X[:, 0] > 0).astype(np.int64))
    model = tmp_path / "m.safetensors"
    run_json("train", tmp_path / "d.npz", "--hidden", "4", "--epochs", "2", "-o", model,
             "--device", "cpu")  # fmt: skip
    (tmp_path / "ids.txt").write_text("0\n1\n")
    monkeypatch.setattr(training_engine, "device_memory", lambda device: 1_000_000)
    result = run("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature",
                 "kfac", "-o", tmp_path / "out.safetensors", "--device", "cpu")  # fmt: skip
    assert_clean_error(result, "more than the 1 MB here; use --curvature ggn or exact")
    assert "layer 'net.layers.0' has an input factor 301 wide" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "ids.txt", "m.safetensors"]


def test_the_memory_a_process_may_use_is_shared_among_torchrun_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU's memory, split among the processes torchrun starts on this machine (each
    fits its own factors); a LOCAL_WORLD_SIZE that is not a count splits nothing."""
    from puma_cli.devices import device_memory

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    whole = device_memory(torch.device("cpu"))
    assert whole is not None and whole > 2**28  # this machine has a few GB at least
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert device_memory(torch.device("cpu")) == whole // 2
    for junk in ("", "0", "two"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", junk)
        assert device_memory(torch.device("cpu")) == whole
