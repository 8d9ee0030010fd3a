"""K-FAC and EK-FAC fit Conv1d layers as the Conv2d over a height of one they are
(`engine/conv1d.py`): the stand-in computes the Conv1d's function, and a 1-D CNN's factors
equal those of the same net written with Conv2d layers, block by block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from puma_cli.engine.conv1d import Conv1dAsConv2d, conv1d_as_conv2d
from puma_cli.engine.factor_fitting import fit_kronecker


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": "same", "dilation": 2},
        {"padding": "valid", "bias": False},
        {"groups": 2, "padding": 2},
    ],
)
def test_the_stand_in_computes_what_the_conv1d_does(options: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, **options).double()
    x = torch.randn(5, 4, 11, dtype=torch.float64)
    stand_in = Conv1dAsConv2d(conv)
    assert torch.allclose(stand_in(x), conv(x), atol=1e-12)
    assert torch.allclose(stand_in(x[0]), conv(x[0]), atol=1e-12)  # unbatched
    assert stand_in.as_conv2d.weight.data_ptr() == conv.weight.data_ptr()  # shared storage
    assert stand_in.as_conv2d.bias is conv.bias


class _Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.deep = nn.Conv1d(4, 4, 3, stride=2, groups=2)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.deep(torch.tanh(self.conv(x)))).flatten(1))


class _Net2d(nn.Module):
    """The same net with Conv2d layers over a height of one: the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, (1, 3), padding=(0, 1))
        self.deep = nn.Conv2d(4, 4, (1, 3), stride=(1, 2), groups=2)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.deep(torch.tanh(self.conv(x.unsqueeze(2)))))
        return self.head(h.squeeze(2).flatten(1))


def _layout(net: nn.Module) -> tuple[list[str], list[int]]:
    return [n for n, _ in net.named_parameters()], [p.numel() for p in net.parameters()]


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_1d_cnns_factors_are_those_of_its_conv2d_twin(kind: str) -> None:
    torch.manual_seed(1)
    net = _Net1d().double().eval()
    twin = _Net2d().double().eval()
    with torch.no_grad():
        for name in ("conv", "deep"):
            getattr(twin, name).weight.copy_(getattr(net, name).weight.unsqueeze(2))
            getattr(twin, name).bias.copy_(getattr(net, name).bias)
        twin.head.load_state_dict(net.head.state_dict())
    X = torch.randn(24, 2, 9, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    assert torch.allclose(net(X), twin(X), atol=1e-12)
    fitted = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    assert isinstance(net.conv, nn.Conv1d) and isinstance(net.deep, nn.Conv1d)  # restored
    assert fitted.left_out == {} and bool(fitted.covered.all())
    reference = fit_kronecker(kind, twin, *_layout(twin), [(X, y)], fisher="type-2")
    assert [b.weight for b in fitted.blocks] == [b.weight for b in reference.blocks]
    v = torch.randn(fitted.size, dtype=torch.float64)
    assert torch.allclose(fitted.matvec(v), reference.matvec(v), atol=1e-10)
    assert torch.allclose(fitted.inverse(v, 0.1), reference.inverse(v, 0.1), atol=1e-8)


def test_a_conv1d_sharing_its_weight_or_padding_otherwise_stays_itself() -> None:
    net = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"), nn.Conv1d(1, 1, 1))
    tied = nn.Conv1d(1, 1, 1)
    tied.weight = net[1].weight
    holder = nn.ModuleDict({"net": net, "tied": tied})
    with conv1d_as_conv2d(holder):
        assert isinstance(net[0], nn.Conv1d)  # circular padding: K-FAC unfolds with zeros
        assert isinstance(net[1], nn.Conv1d) and isinstance(holder["tied"], nn.Conv1d)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
def test_ekfac_leaves_out_a_conv1d_it_cannot_unfold_and_kfac_fits_it() -> None:
    """padding='same' over an even span pads one more after than before: EK-FAC's refit
    cannot unfold that, so EK-FAC leaves the Conv1d out (as before it was fitted at all)
    instead of refusing the model; K-FAC fits it."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv1d(2, 3, 4, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8, 2)
    ).double()
    X = torch.randn(12, 2, 8, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    ekfac = fit_kronecker("ekfac", net, *_layout(net), [(X, y)], fisher="type-2")
    assert ekfac.left_out == {"Conv1d": 3 * 2 * 4 + 3}
    kfac = fit_kronecker("kfac", net, *_layout(net), [(X, y)], fisher="type-2")
    assert kfac.left_out == {}
