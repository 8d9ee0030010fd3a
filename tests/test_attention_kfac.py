"""K-FAC on self-attention: a MultiheadAttention's projections are fitted as the Linear
layers they are once its stand-in calls them as modules; the stand-in computes what the
attention does (masks included) and hands anything else back to it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from puma_cli.engine.attention import AttentionThroughModules
from puma_cli.engine.factor_fitting import fit_kronecker

E, HEADS, L = 8, 2, 5


def _attention(batch_first: bool, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first).double().eval()


CASES = {
    "no mask": {},
    "key padding": {"key_padding_mask": "padding"},
    "causal, with its mask": {"attn_mask": "causal", "is_causal": True},
    "float mask, weights per head": {"attn_mask": "float", "average_attn_weights": False},
    "no weights asked": {"need_weights": False, "key_padding_mask": "padding"},
}


def _kwargs(case: dict, n: int) -> dict:
    kwargs = dict(case)
    if kwargs.get("key_padding_mask") == "padding":
        padding = torch.zeros(n, L, dtype=torch.bool)
        padding[0, -2:] = True  # the first row's last two tokens are padding
        kwargs["key_padding_mask"] = padding
    if kwargs.get("attn_mask") == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L).bool()
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(L, L, dtype=torch.float64)
    return kwargs


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_the_stand_in_computes_what_the_attention_does(
    case: str, batch_first: bool, bias: bool
) -> None:
    mha = _attention(batch_first, bias)
    x = torch.randn((3, L, E) if batch_first else (L, 3, E), dtype=torch.float64)
    kwargs = _kwargs(CASES[case], 3)
    expected = mha(x, x, x, **kwargs)
    stand_in = AttentionThroughModules(mha)
    found = stand_in(x, x, x, **kwargs)
    assert torch.allclose(found[0], expected[0], atol=1e-12)
    if expected[1] is None:
        assert found[1] is None
    else:
        assert found[1] is not None and torch.allclose(found[1], expected[1], atol=1e-12)
    assert stand_in.in_proj.weight is mha.in_proj_weight  # the same parameters
    assert stand_in.batch_first == batch_first  # what callers read of the attention
    copied = copy.deepcopy(stand_in)  # a copy computes the same, with its own parameters
    assert torch.allclose(copied(x, x, x, **kwargs)[0], expected[0], atol=1e-12)


def test_cross_attention_and_unbatched_input_run_the_attention_itself() -> None:
    mha = _attention(True)
    stand_in = AttentionThroughModules(mha)
    called: list[str] = []
    stand_in.in_proj.register_forward_hook(lambda *_: called.append("in_proj"))
    x, memory = torch.randn(2, L, E, dtype=torch.float64), torch.randn(2, 3, E, dtype=torch.float64)
    assert torch.allclose(stand_in(x, memory, memory)[0], mha(x, memory, memory)[0])
    single = torch.randn(L, E, dtype=torch.float64)
    assert torch.allclose(stand_in(single, single, single)[0], mha(single, single, single)[0])
    assert called == []  # neither went through the module-shaped projection


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, E)
        self.encoder = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(1))


def _layout(net: nn.Module) -> tuple[list[str], list[int]]:
    return [n for n, _ in net.named_parameters()], [p.numel() for p in net.parameters()]


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_fits_self_attention_as_the_linear_layers_it_is(kind: str) -> None:
    """The factors of a TransformerEncoderLayer's attention equal those of the same net
    with the stand-in built in (its projections plain Linear children), block by block;
    only the LayerNorms are left out, and the attention is itself again afterwards."""
    torch.manual_seed(2)
    net = _Net().double().eval()
    X = torch.randn(16, L, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    fitted = fit_kronecker(kind, net, *_layout(net), [(X, y)], fisher="type-2")
    assert isinstance(net.encoder.self_attn, nn.MultiheadAttention)  # restored
    assert fitted.left_out == {"LayerNorm": 4 * E}
    built_in = _Net().double().eval()
    built_in.load_state_dict(net.state_dict())
    built_in.encoder.self_attn = AttentionThroughModules(built_in.encoder.self_attn)
    twin = fit_kronecker(kind, built_in, *_layout(built_in), [(X, y)], fisher="type-2")
    by_name = {b.module: b for b in twin.blocks}
    assert {b.module for b in fitted.blocks} == set(by_name)
    assert {"encoder.self_attn.in_proj", "encoder.self_attn.out_proj"} <= set(by_name)
    for block in fitted.blocks:
        other = by_name[block.module]
        M = torch.randn(block.weight_shape[0], block.Qa.shape[0], dtype=torch.float64)
        mine = block.Qb @ ((block.Qb.T @ M @ block.Qa) * block.E) @ block.Qa.T
        theirs = other.Qb @ ((other.Qb.T @ M @ other.Qa) * other.E) @ other.Qa.T
        assert torch.allclose(mine, theirs, atol=1e-10), block.module
