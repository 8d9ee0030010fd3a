"""Which layers K-FAC and EK-FAC fit, and how: the Linear and Conv2d layers a probe
forward reaches (`probed_layers`), their factors' widths read off them before any fit
(`factor_shapes`), the layers shared over positions fitted as K-FAC-expand where
K-FAC-reduce would hold almost none of their curvature (`expanded_layers`), and the wide
Linear layers whose input factor is taken from its rows (`through_rows`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from puma_cli import parallel
from puma_cli.engine.attention import attention_as_modules
from puma_cli.engine.conv1d import conv1d_as_conv2d
from puma_cli.engine.kernels import composite_kernels
from puma_cli.engine.kronecker import keeps_range
from puma_cli.engine.stand_ins import tied_layers

Tensor = torch.Tensor
# Reduce assumes a row's inputs at one layer alike over its positions; where they cancel
# (averaged over them, LayerNorm'd channels give its mean, the same every row) or its
# output gradients sum to 0 over them (a LayerNorm over those positions downstream), its
# factors hold almost none of the layer's curvature and the inverse pours the patch into
# it: an MLP-Mixer's token-mixing layers. Such a layer is fitted as expand: one whose
# reduce factors' trace is under EXPAND_BELOW of its GGN block's, measured on PROBE_ROWS
# fitting rows (`expanded_layers`). Measured (reduce's trace over the block's): a user's
# Mixer's token-mixing layers 0.0000-0.031 (its channel MLPs 0.39-1.03); the stems of a
# ResNet-18 and the paper's DenseNet on 8x8 digits 0.017 and 0.036 (their other layers
# 0.20-0.98), the digits CNN's 0.10. On the Mixer the removal's marked loss went from 0.047
# to 0.133 (retraining 0.44); the ResNet's patch moved by a cosine of 0.98.
EXPAND_BELOW = 0.05
PROBE_ROWS = 32
PROBE_VALUES = 2**24  # fewer probe rows where one row's patches at a layer hold more


def input_width(layer: nn.Linear | nn.Conv2d) -> int:
    """in', the width of a layer's input factor: its inputs (a convolution's patch) and
    the 1 its bias adds."""
    return layer.weight[0].numel() + (layer.bias is not None)


def through_rows(linear: bool, width: int, rows: int, kind: str, positions: int = 1) -> bool:
    """Whether the fit takes a layer's input factor from the rows of its inputs (`rows`
    fitting rows, `width` = in'), never forming the width x width factor: a Linear
    layer (`linear`) wide enough for `decompose` to keep a range. Under EK-FAC only a
    layer that sees one position a row (`positions`, a row of features, not tokens):
    its refit squares each row's gradient in the basis, and at a layer over tokens a
    row's gradient has parts outside the span of the rows' mean inputs (K-FAC-reduce's
    factor): EK-FAC sums that layer's factor and takes its whole eigenbasis."""
    return linear and keeps_range(width, rows) and (kind == "kfac" or positions == 1)


def probed_layers(
    module: nn.Module, probe: Tensor, without_gradient: set[str] | None = None
) -> list[tuple[str, nn.Linear | nn.Conv2d, int]]:
    """The Linear and Conv2d layers whose parameters all train (a frozen one is not in
    theta; one frozen in part gets no block, and its trainable part is left out) and whose
    forward runs on `probe`, a row or two of input, with gradients: a layer the network's
    forward runs under torch.no_grad (a fixed feature extractor whose parameters still
    require grad) has none to fit its factors with, and its gradient is 0 in every pass;
    it is left out, its name added to `without_gradient`. A layer whose weight another module
    uses directly (MultiheadAttention's out_proj, outside `as_layers`, which
    callers hold while fitting) has no input or output of its own for the factors to be
    taken at: it is left out, like any other layer K-FAC does not know,
    and so are layers that share a weight (`self.b.weight = self.a.weight`): one block per
    layer cannot hold a tensor's curvature from two layers. A layer held under two names
    (`self.b = self.a`) is one layer, its factors summed over its calls. Beside each,
    the most positions a row of input had at one of its calls: the tokens a Linear
    layer sees (1 for a row of features), a convolution's output positions."""
    tied = tied_layers(module)
    layers = [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
        and all(p.requires_grad for p in m.parameters())
        and not parametrize.is_parametrized(m)  # weight_norm: its weight is computed
        and id(m) not in tied
    ]
    ran: dict[str, int] = {}
    quiet: set[str] = set()

    def seen(name: str, layer: nn.Module, output: Tensor) -> None:
        shape = output.shape[2:] if isinstance(layer, nn.Conv2d) else output.shape[1:-1]
        ran[name] = max(ran.get(name, 1), math.prod(shape))
        if not output.requires_grad:
            quiet.add(name)

    hooks = [
        m.register_forward_hook(lambda layer, _, output, name=n: seen(name, layer, output))
        for n, m in layers
    ]
    try:
        with torch.enable_grad(), composite_kernels(module):
            module(probe.clone())  # a copy: a forward may write into its input
    finally:
        for hook in hooks:
            hook.remove()
    if without_gradient is not None:
        without_gradient |= quiet
    return [(n, m, ran[n]) for n, m in layers if n in ran and n not in quiet]


def expanded_layers(
    module: nn.Module,
    probed: list[tuple[str, nn.Linear | nn.Conv2d, int]],
    X: Tensor,
    seed: int,
) -> frozenset[str]:
    """The layers shared over positions whose K-FAC-reduce factors hold under EXPAND_BELOW
    of their GGN block's trace, measured on the rows X (one label a row sampled from the
    model's softmax, seeded): the true trace sum_n |sum_s g_ns a_ns^T|^2 (a row's gradient
    at the layer's output g and its input a, a patch for a convolution, a 1 for the
    bias), reduce's mean_n |mean_s a_ns|^2 x sum_n |sum_s g_ns|^2. Every process probes the
    same rows, and a layer any of them picks is taken by all. None where no layer sees
    more than one position; never a convolution that expand cannot unfold (`unfolds`)."""
    shared = {name: layer for name, layer, positions in probed if positions > 1 and unfolds(layer)}
    if not shared:
        return frozenset()
    widest = max(at * input_width(layer) for name, layer, at in probed if name in shared)
    X = X[: max(2, min(len(X), PROBE_VALUES // widest))]
    inputs: dict[str, list[Tensor]] = {name: [] for name in shared}
    traces: dict[str, list[float]] = {name: [0.0, 0.0] for name in shared}

    def measure(name: str, layer: nn.Linear | nn.Conv2d, grad: Tensor) -> None:
        # the backward pass meets a layer's calls in reverse: its last input is this one's
        a, g = inputs[name].pop(), grad.detach()
        if isinstance(layer, nn.Conv2d):
            from curvlinops.kfac_utils import extract_patches

            a = extract_patches(
                a, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups
            )
            g = g.flatten(2).transpose(1, 2)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        for k, trace in enumerate(layer_traces(a, g)):  # summed over a layer's calls
            traces[name][k] += trace

    def keep_input(name: str, x: Tensor) -> None:
        inputs[name].append(x.detach())

    def on_output(name: str, layer: nn.Linear | nn.Conv2d, out: Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda grad: measure(name, layer, grad))

    hooks = [
        h
        for name, layer in shared.items()
        for h in (
            layer.register_forward_pre_hook(lambda _, i, name=name: keep_input(name, i[0])),
            layer.register_forward_hook(
                lambda layer, _, out, name=name: on_output(name, layer, out)
            ),
        )
    ]
    try:
        with torch.enable_grad(), composite_kernels(module):
            logits = module(X.clone())
            generator = torch.Generator(device=logits.device).manual_seed(seed)
            probs = logits.detach().double().softmax(dim=1)
            y = torch.multinomial(probs, 1, generator=generator)[:, 0]
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            params = [p for layer in shared.values() for p in layer.parameters()]
            torch.autograd.grad(loss, params, allow_unused=True)  # the hooks measure
    finally:
        for hook in hooks:
            hook.remove()
        inputs.clear()
    names = sorted(traces)
    votes = torch.tensor(
        [float(traces[n][1] < EXPAND_BELOW * traces[n][0]) for n in names], dtype=torch.float64
    )
    parallel.all_reduce(votes)  # one choice on every process, whatever its rounding
    return frozenset(name for name, vote in zip(names, votes.tolist(), strict=True) if vote > 0)


def layer_traces(a: Tensor, g: Tensor) -> tuple[float, float]:
    """A shared layer's GGN block's trace over rows of inputs a (n, S, in) and output
    gradients g (n, S, out), sum_n |sum_s g_ns a_ns^T|^2, and its reduce factors',
    mean_n |mean_s a_ns|^2 x sum_n |sum_s g_ns|^2. The first through the rows' S x S Gram
    matrices where that costs less (S^2 (in + out) against S in out a row)."""
    s, i, o = a.shape[1], a.shape[2], g.shape[2]
    if s * (i + o) < i * o:
        true = (torch.einsum("nsi,nti->nst", g, g) * torch.einsum("nsi,nti->nst", a, a)).sum()
    else:
        true = (torch.einsum("nsi,nsj->nij", g, a) ** 2).sum()
    reduce = (a.mean(1) ** 2).sum(1).mean() * (g.sum(1) ** 2).sum()
    return float(true), float(reduce)


@contextmanager
def as_layers(module: nn.Module, kind: str = "kfac") -> Iterator[None]:
    """Within the block, what K-FAC cannot see as a layer runs as one: self-attention's
    projections (`attention.py`) and each Conv1d as a Conv2d (`conv1d.py`; for EK-FAC,
    not one padded unequally, which its refit cannot unfold)."""
    with attention_as_modules(module), conv1d_as_conv2d(module, kind != "ekfac"):
        yield


@dataclass(frozen=True)
class FactorShape:
    """A layer K-FAC would fit, before fitting: its input factor `inputs` wide (in', with
    the bias's 1, a convolution's patch), its output factor `outputs` wide."""

    layer: str
    inputs: int
    outputs: int
    linear: bool = True  # a Linear layer (else a convolution)
    positions: int = 1  # a row's positions at the layer (`probed_layers`)


def factor_shapes(module: nn.Module, probe: Tensor) -> list[FactorShape]:
    """The layers K-FAC would fit in the module (self-attention's included; none: K-FAC
    has nothing to fit) and the widths of their factors, read off the layers."""
    with as_layers(module):
        layers = probed_layers(module, probe)
    return [
        FactorShape(
            name, input_width(layer), layer.weight.shape[0], isinstance(layer, nn.Linear), positions
        )
        for name, layer, positions in layers
    ]


def unfolds(layer: nn.Linear | nn.Conv2d) -> bool:
    """Whether curvlinops 3.0.1 can unfold the layer's input into its patches, as EK-FAC's
    refit and K-FAC-expand do: not a convolution with `padding='same'` over an even span
    (dilation x (kernel - 1) odd), which pads one more after than before."""
    if not isinstance(layer, nn.Conv2d) or layer.padding != "same":
        return True
    spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    return not any(span % 2 for span in spans)
