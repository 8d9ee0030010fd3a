"""One-dimensional convolutions as two-dimensional ones, so that K-FAC fits them.

curvlinops' K-FAC and EK-FAC know Linear and Conv2d layers; a `Conv1d` (audio, sensor
series, text CNNs) was left out of the curvature, and a 1-D CNN's patch then moved its
head alone. A Conv1d over (n, C, L) is the Conv2d over (n, C, 1, L) with a (1, k) kernel:
the same patches, the same weight read as (out, in / groups x k), so the same Kronecker
factors. `conv1d_as_conv2d` puts a stand-in (a Conv2d child, `as_conv2d`, holding a 4-D
view of the same weight) in place of each Conv1d with zero padding while the factors are
fitted; `theta_name` maps the stand-in's names back to the Conv1d's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from puma_cli.engine.stand_ins import children_replaced, tied_layers

STAND_IN = "as_conv2d"  # the stand-in's Conv2d child: `<conv1d>.as_conv2d`


class Conv1dAsConv2d(nn.Module):
    """A Conv1d computed by a Conv2d over a height of one; its weight a view of the
    Conv1d's, its bias the Conv1d's own."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        inner = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            (1, conv.kernel_size[0]),
            stride=(1, conv.stride[0]),
            padding=padding,
            dilation=(1, conv.dilation[0]),
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        inner.weight = nn.Parameter(conv.weight.detach().unsqueeze(2))  # shares its storage
        inner.bias = conv.bias
        setattr(self, STAND_IN, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner: nn.Conv2d = getattr(self, STAND_IN)
        if x.dim() == 2:  # unbatched (C, L)
            return inner(x[None, :, None, :])[0, :, 0, :]
        return inner(x.unsqueeze(2)).squeeze(2)


def stands_in(conv: nn.Conv1d, unequal_padding: bool = True) -> bool:
    """Whether `Conv1dAsConv2d` computes this Conv1d as it is: zero padding (K-FAC
    unfolds the patches with zeros), every parameter trained, a plain weight; without
    `unequal_padding` (EK-FAC's refit cannot unfold it), not `padding='same'` over an
    even span, which pads one more after than before."""
    uneven = conv.padding == "same" and conv.dilation[0] * (conv.kernel_size[0] - 1) % 2 == 1
    return (
        conv.padding_mode == "zeros"
        and all(p.requires_grad for p in conv.parameters())
        and not torch.nn.utils.parametrize.is_parametrized(conv)
        and (unequal_padding or not uneven)
    )


def conv1d_as_conv2d(
    module: nn.Module, unequal_padding: bool = True
) -> AbstractContextManager[None]:
    """Within the block, each Conv1d `stands_in` takes is replaced by its Conv1dAsConv2d
    (the same parameters' values); restored after. A Conv1d sharing a parameter with
    another module stays (one block cannot hold a tensor's curvature from two layers),
    and so does one EK-FAC cannot unfold (`unequal_padding` False): left out, as before."""
    tied = tied_layers(module)

    def replacement(child: nn.Module) -> nn.Module | None:
        if (
            isinstance(child, nn.Conv1d)
            and stands_in(child, unequal_padding)
            and id(child) not in tied
        ):
            return Conv1dAsConv2d(child)
        return None

    return children_replaced(module, replacement)
