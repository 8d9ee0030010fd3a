"""K-FAC and EK-FAC: the Gauss-Newton matrix as Kronecker factors, inverted in closed form.

For each Linear and Conv2d layer (a Conv1d runs as a Conv2d, `conv1d.py`), with its
weight and bias taken together as one matrix
M (out, in + 1), K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions)
approximates the layer's block of the GGN as A (x) B: A the inputs' second moment,
B that of the gradients at the layer's output (for shared weights, the reduce variant:
see APPROXIMATION). With A = Qa diag(la) Qa^T and
B = Qb diag(lb) Qb^T, every block is diagonal in the eigenbasis Qb (x) Qa with
eigenvalues lb la^T; EK-FAC (George et al. 2018) keeps the basis and refits those
eigenvalues to the data, which is exact for a single row. So

    (C + mu I)^-1 vec(M) = vec( Qb [ (Qb^T M Qa) / (E + mu) ] Qa^T ),  E = lb la^T or refit,

one small matrix product per layer: a solve costs nothing next to a pass over the data.
An input factor fitted on fewer rows than half its width keeps only the eigenvectors of
its range (`decompose`): Qa is (in', k), and on the rest, where A is 0, the inverse is
1 / mu, the term (M - M Qa Qa^T) / mu.
Layers between blocks are ignored (block-diagonal). Parameters of other layers
(BatchNorm's scale and shift, embeddings, ...) have no curvature here and are left where
they are: a solve returns 0 for them, and `uncovered` counts them. Damping alone (b / mu
for them) was measured first: on ResNet-18 it moved BatchNorm far enough to take test
accuracy from 1.00 to 0.19 at every step size the guard tried.

The factors are fitted by `curvlinops-for-pytorch` (pinned; it handles the hooks, the
unfolding of convolutions and the sampling of labels) on a subsample of the training
rows, once per model, and cached beside it (`<stem>.factors.safetensors`, in the dtype
they were fitted in).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from puma_cli import parallel
from puma_cli.engine.attention import attention_as_modules, theta_name
from puma_cli.engine.conv1d import conv1d_as_conv2d
from puma_cli.engine.kernels import composite_kernels
from puma_cli.engine.stand_ins import tied_layers
from puma_cli.errors import PumaError

Tensor = torch.Tensor
KINDS = ("kfac", "ekfac")
FISHER = ("type-2", "mc")  # the exact GGN per row, or one sampled label per row
# Weights shared over positions (a convolution, a Linear on tokens) with one loss per row:
# K-FAC-reduce (Eschenhagen et al. 2023) averages the inputs over positions and sums the
# output gradients, which is exact for one image through a linear layer and pooling;
# K-FAC-expand (curvlinops' default) counts every position as a row. Measured on a ResNet-18
# (width 16, 1,000 images, against CG on the exact GGN): cosine 0.38 against 0.17 at
# damping 0.01, rank correlation of the scores 0.75 against 0.50, the fit 4x faster
# (3.1 s against 13.1 s); the same on the digits CNN (0.62-0.72 for both). For a Linear
# layer on (rows, features) the two are the same.
APPROXIMATION = "reduce"
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
# Under K-FAC-reduce each fitting row adds one vector (its inputs averaged over positions)
# to a layer's input factor, so the factor's rank is at most the rows it is fitted on. Past
# this width, a factor wider than twice its rank bound is decomposed through a sketch of
# that rank (`decompose`): ResNet-18's 4,608-wide last-stage factors on 2,000 rows.
LOW_RANK_MIN = 1024
OVERSAMPLE = 64  # sketch columns past the rank bound: rounding lifts the null space a little
RANGE_TOLERANCE = 1e-4  # what the sketch may miss of the factor on random probes


def keeps_range(width: int, rank_bound: int) -> bool:
    """Whether a factor `width` wide, of rank `rank_bound` at most, keeps only the
    eigenvectors of its range (`decompose`, `through_rows`): at least LOW_RANK_MIN wide
    and more than twice rank_bound + OVERSAMPLE."""
    return width >= LOW_RANK_MIN and 2 * (rank_bound + OVERSAMPLE) <= width


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


@dataclass
class Block:
    """One layer: its weight's and bias's positions in theta, the eigenbases Qa (in', k)
    and Qb (out, out), and the eigenvalues E (out, k), in' = in + 1 with a bias; k = in'
    unless Qa holds only the range of A (then A is 0 on the rest)."""

    module: str
    weight: tuple[int, int]  # (offset, size) in theta
    weight_shape: tuple[int, ...]
    bias: tuple[int, int] | None
    Qa: Tensor
    Qb: Tensor
    E: Tensor

    @property
    def range_only(self) -> bool:
        """Whether Qa holds only the range of A (A, hence C, is 0 on the rest)."""
        return self.Qa.shape[1] < self.Qa.shape[0]

    def matrix(self, flat: Tensor) -> Tensor:
        """The layer's part of a (P,) vector as its (out, in') joint matrix; of a (B, P)
        batch of vectors, (B, out, in')."""
        start, size = self.weight
        out = self.weight_shape[0]
        lead = flat.shape[:-1]
        W = flat[..., start : start + size].reshape(*lead, out, -1)
        if self.bias is None:
            return W
        b_start, b_size = self.bias
        bias = flat[..., b_start : b_start + b_size].reshape(*lead, out, 1)
        return torch.cat([W, bias], dim=-1)

    def place(self, flat: Tensor, M: Tensor) -> None:
        """Write a joint matrix back into a (P,) vector; a (B, out, in') batch of them into
        a (B, P) batch of vectors."""
        start, size = self.weight
        lead = flat.shape[:-1]
        flat[..., start : start + size] = M[..., : size // M.shape[-2]].reshape(*lead, -1)
        if self.bias is not None:
            b_start, b_size = self.bias
            flat[..., b_start : b_start + b_size] = M[..., -1]


@dataclass
class KroneckerCurvature:
    """The block-diagonal K-FAC or EK-FAC approximation of the GGN over P parameters."""

    kind: str
    blocks: list[Block]
    size: int
    covered: Tensor  # (P,) bool: parameters inside a block
    left_out: dict[str, int] = field(default_factory=dict)  # module class: parameters
    from_rows: frozenset[str] = frozenset()  # layers whose input factor came from its rows
    expanded: frozenset[str] = frozenset()  # layers fitted as K-FAC-expand (`expanded_layers`)

    @property
    def uncovered(self) -> int:
        """How many parameters get damping only (no layer K-FAC knows)."""
        return int((~self.covered).sum())

    def lambda_max(self) -> float:
        return max((float(b.E.max()) for b in self.blocks), default=0.0)

    def matvec(self, v: Tensor) -> Tensor:
        """C v (P,); zero on the uncovered parameters."""
        out = torch.zeros_like(v)
        for block in self.blocks:
            M = block.Qb.T @ block.matrix(v) @ block.Qa
            block.place(out, block.Qb @ (M * block.E) @ block.Qa.T)
        return out

    def inverse(self, b: Tensor, mu: float) -> Tensor:
        """(C + mu I)^-1 b (P,), or each row of a (B, P) batch: closed form per block; 0 on
        the uncovered parameters."""
        out = torch.zeros_like(b)
        for block in self.blocks:
            G = block.matrix(b)
            GQa = G @ block.Qa
            solved = block.Qb @ ((block.Qb.T @ GQa) / (block.E + mu)) @ block.Qa.T
            if block.range_only:  # A's null space: C is 0 there
                solved += (G - GQa @ block.Qa.T) / mu
            block.place(out, solved)
        return out

    def inverse_norms(self, rows: Tensor, mu: float) -> Tensor:
        """g (C + mu I)^-1 g for each row g of `rows` (B, P): (B,) float64, the uncovered
        parameters left out as `inverse` leaves them.

        Per block, the sum of (Qb^T G Qa)^2 / (E + mu), plus |G - G Qa Qa^T|^2 / mu where
        Qa holds A's range alone, which is |G|^2 - |G Qa|^2 (Qa's columns orthonormal):
        half the products of `g . inverse(g)`, which rotates the solve back first. The
        rotations run in the rows' own precision (a float32 engine's gradients carry no
        more than float32 holds; float64 rows get float64), the squares and their sums in
        float64."""
        out = rows.new_zeros(rows.shape[:-1], dtype=torch.float64)
        for block in self.blocks:
            G = block.matrix(rows)
            GQa = G @ block.Qa.to(rows.dtype)
            rotated = (block.Qb.T.to(rows.dtype) @ GQa).double()
            out += (rotated**2 / (block.E + mu)).sum(dim=(-2, -1))
            if block.range_only:  # A's null space: C is 0 there
                rest = (G.double() ** 2).sum(dim=(-2, -1)) - (GQa.double() ** 2).sum(dim=(-2, -1))
                out += rest.clamp_min(0) / mu
        return out

    def to_tensors(self, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """The factors by layer, in `dtype`: the fit's, which holds them exactly."""
        tensors: dict[str, Tensor] = {}
        for block in self.blocks:
            for name in ("Qa", "Qb", "E"):
                tensors[f"{block.module}.{name}"] = getattr(block, name).to(dtype).contiguous()
            if block.module in self.expanded:  # a mark, for the report of a cached request
                tensors[f"{block.module}.expanded"] = torch.ones(1, dtype=dtype)
        return tensors


def supported_layers(module: nn.Module, probe: Tensor) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    """`probed_layers` without their positions."""
    return [(name, layer) for name, layer, _ in probed_layers(module, probe)]


def probed_layers(module: nn.Module, probe: Tensor) -> list[tuple[str, nn.Linear | nn.Conv2d, int]]:
    """The Linear and Conv2d layers whose parameters all train (a frozen one is not in
    theta; one frozen in part gets no block, and its trainable part is left out) and whose
    forward runs on `probe`, a row or two of input. A layer whose weight another module
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

    def seen(name: str, layer: nn.Module, output: Tensor) -> None:
        shape = output.shape[2:] if isinstance(layer, nn.Conv2d) else output.shape[1:-1]
        ran[name] = max(ran.get(name, 1), math.prod(shape))

    hooks = [
        m.register_forward_hook(lambda layer, _, output, name=n: seen(name, layer, output))
        for n, m in layers
    ]
    try:
        with torch.no_grad(), composite_kernels(module):
            module(probe.clone())  # a copy: a forward may write into its input
    finally:
        for hook in hooks:
            hook.remove()
    return [(n, m, ran[n]) for n, m in layers if n in ran]


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


def _positions(names: list[str], sizes: list[int]) -> dict[str, tuple[int, int]]:
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return {n: (int(o), int(s)) for n, o, s in zip(names, offsets, sizes, strict=True)}


def _left_out(
    module: nn.Module, names: list[str], sizes: list[int], covered: Tensor
) -> dict[str, int]:
    """The parameters outside every block, counted by the class of the module holding them
    (`LayerNorm`, `Conv1d`, ...), so that a report can say which layers a patch leaves."""
    counts: dict[str, int] = {}
    tied = tied_layers(module)
    for name, (start, size) in _positions(names, sizes).items():
        if bool(covered[start : start + size].any()):
            continue
        owner, within, _ = name.partition(".parametrizations.")
        holder = module.get_submodule(owner if within else name.rpartition(".")[0])
        kind = type(holder).__name__
        if parametrize.is_parametrized(holder):  # weight_norm, spectral_norm: a computed weight
            kind = f"parametrized {kind.removeprefix('Parametrized')}"  # torch's subclass
        elif id(holder) in tied:  # shares a weight with another layer
            kind = f"tied {kind}"
        elif isinstance(holder, nn.Linear | nn.Conv2d):  # a layer K-FAC knows, left out:
            if not all(p.requires_grad for p in holder.parameters()):
                kind = f"partly frozen {kind}"
            else:  # its forward never ran (or another module takes its weight directly)
                kind = f"{kind} never called as a layer"
        counts[kind] = counts.get(kind, 0) + size
    return counts


def _curvature(
    kind: str,
    module: nn.Module,
    layers: list[tuple[str, nn.Linear | nn.Conv2d]],
    names: list[str],
    sizes: list[int],
    factors: dict[str, tuple[Tensor, ...]],
) -> KroneckerCurvature:
    blocks, covered = _blocks(layers, names, sizes, factors)
    left_out = _left_out(module, names, sizes, covered)
    return KroneckerCurvature(kind, blocks, sum(sizes), covered, left_out)


def _blocks(
    layers: list[tuple[str, nn.Linear | nn.Conv2d]],
    names: list[str],
    sizes: list[int],
    factors: dict[str, tuple[Tensor, ...]],
) -> tuple[list[Block], Tensor]:
    where = _positions(names, sizes)
    known = set(where)
    covered = torch.zeros(sum(sizes), dtype=torch.bool)
    blocks = []
    for name, layer in layers:
        weight = where[theta_name(name, "weight", known)]
        bias = where.get(theta_name(name, "bias", known)) if layer.bias is not None else None
        Qa, Qb, E = factors[name]
        blocks.append(Block(name, weight, tuple(layer.weight.shape), bias, Qa, Qb, E))
        covered[weight[0] : weight[0] + weight[1]] = True
        if bias is not None:
            covered[bias[0] : bias[0] + bias[1]] = True
    return blocks, covered


def fit_kronecker(
    kind: str,
    module: nn.Module,
    names: list[str],
    sizes: list[int],
    batches: list[tuple[Tensor, Tensor]],
    fisher: str = "mc",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    class_weight: Tensor | None = None,
) -> KroneckerCurvature:
    """Fit K-FAC or EK-FAC of the mean cross-entropy's GGN over `batches` (X, y), for the
    module's parameters in the order `names` (theta's layout); `progress(done, total)`
    after each batch of this process's (EK-FAC takes two passes over them). With
    `class_weight` (K,), each row's share is weighted by its class's weight, as the
    class-weighted loss's GGN weighs it."""
    if kind not in KINDS:
        raise PumaError(f"--curvature {kind!r}: choose exact, ggn, kfac or ekfac")
    with as_layers(module, kind):  # self-attention's projections, Conv1d, as layers
        return _fit(kind, module, names, sizes, batches, fisher, seed, progress, class_weight)


def _fit(
    kind: str,
    module: nn.Module,
    names: list[str],
    sizes: list[int],
    batches: list[tuple[Tensor, Tensor]],
    fisher: str,
    seed: int,
    progress: Callable[[int, int], None] | None,
    class_weight: Tensor | None = None,
) -> KroneckerCurvature:
    probed = probed_layers(module, batches[0][0][:2])
    layers = [(name, layer) for name, layer, _ in probed]
    if not layers:
        raise PumaError(
            f"--curvature {kind} approximates Linear, Conv1d and Conv2d layers, and this model has "
            "none it can fit (each is frozen, parametrized as by weight_norm, tied to "
            "another layer's weight, or used by weight alone); use --curvature ggn or exact"
        )
    if kind == "ekfac":
        _check_ekfac_unfolds(layers)
    expand = expanded_layers(module, probed, batches[0][0][:PROBE_ROWS], seed)
    params = [p for n, layer in layers for p in (layer.weight, layer.bias) if p is not None]
    total = sum(int(y.shape[0]) for _, y in batches)
    by_rows = [
        name
        for name, layer, at in probed
        if name not in expand and _through_rows(layer, total, kind, at)
    ]
    mine = parallel.block(len(batches), f"{total} factor-fitting rows in batches")
    steps = len(mine) * (2 if kind == "ekfac" else 1)

    def after(earlier: int) -> Callable[[int], None]:
        """Progress after a pass's k-th batch, `earlier` batches of a first pass before."""
        return lambda k: None if progress is None else progress(earlier + k, steps)

    with warnings.catch_warnings(), composite_kernels(module):
        # curvlinops (and backpack, which it imports) warn about their own internals.
        warnings.simplefilter("ignore")
        from curvlinops import EKFACLinearOperator, KFACLinearOperator

        operator_class = _batched_type2(
            EKFACLinearOperator if kind == "ekfac" else KFACLinearOperator
        )

        def fitted(through_input: bool) -> Any:
            operator = operator_class(
                module,
                nn.CrossEntropyLoss(),
                params,
                [batches[mine.start]],
                fisher_type=fisher,
                separate_weight_and_bias=False,
                check_deterministic=False,
                seed=seed,
                num_data=total,
                num_per_example_loss_terms=1,
                kfac_approx=APPROXIMATION,
            )
            operator._class_weight = class_weight
            operator._input_rows = {name: [] for name in by_rows}
            operator._expand = expand
            # One batch at a time, each with its own seed for the sampled labels, so that
            # the sums (all-reduced under torchrun) do not depend on how the batches are
            # split. curvlinops 3.0.1 accumulates the factors over calls; pinned for that.
            compute = operator.compute_kronecker_factors
            _accumulate(
                operator, compute, batches, mine, seed, through_input, after(0), FACTOR_SUMS
            )
            return operator

        through_input = True
        operator = fitted(through_input)
        # A layer whose output does not depend on the input got no gradient at it.
        if not set(operator._mapping) <= set(operator._gradient_covariances):
            through_input = False
            operator = fitted(through_input)
        inputs = {name: _gathered_rows(operator._input_rows.pop(name)) for name in by_rows}
        if kind == "ekfac":
            operator._compute_eigenvectors()  # of the factors it summed
            # A layer fitted through its rows: the span of its rows is its basis, with
            # A's eigenvectors in it; a row's gradient there lies in that span, so the
            # refit is the whole basis's (0 on the rest, where the inverse takes 1 / mu).
            eigenvectors = operator._input_covariances_eigenvectors
            for name in by_rows:
                eigenvectors[name] = decompose_rows(inputs.pop(name))[1]
            compute = operator.compute_eigenvalue_correction
            _accumulate(
                operator, compute, batches, mine, seed, through_input, after(len(mine)),
                ("_corrected_eigenvalues",),
            )  # fmt: skip
        state = operator.state_dict()
    # Decomposed in the fit's dtype, as curvlinops decomposes EK-FAC's, and only then
    # taken to float64: a float32 eigh costs half a float64 one (ResNet-18's 4,608-wide
    # input factors: 9.2 s against 16.0 s each on 2 cores), and its errors (~1e-7 of the
    # largest eigenvalue) lie far below the damping (1e-2 of it). On ResNet-18 (width 64,
    # 1,295 digits) a cold removal fell from 89 s to 64 s, its step within 1.2e-5.
    # Every value stays one of the fit's dtype, so the cache holds them in it losslessly.
    factors: dict[str, tuple[Tensor, ...]] = {}
    for name, _ in layers:
        if kind == "ekfac":
            Qa = state["input_covariances_eigenvectors"][name]
            Qb = state["gradient_covariances_eigenvectors"][name]
            E = _joint_eigenvalues(state["corrected_eigenvalues"][name])
        else:
            if name in inputs:
                la, Qa = decompose_rows(inputs.pop(name))
            else:
                la, Qa = decompose(state["input_covariances"][name], total)
            lb, Qb = torch.linalg.eigh(state["gradient_covariances"][name])
            E = lb.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]
        factors[name] = tuple(t.double().contiguous() for t in (Qa, Qb, E.clamp_min(0)))
    curvature = _curvature(kind, module, layers, names, sizes, factors)
    curvature.covered = curvature.covered.to(curvature.blocks[0].E.device)
    curvature.from_rows = frozenset(by_rows)
    curvature.expanded = expand
    return curvature


def _through_rows(layer: nn.Linear | nn.Conv2d, rows: int, kind: str, positions: int) -> bool:
    return through_rows(isinstance(layer, nn.Linear), input_width(layer), rows, kind, positions)


def _gathered_rows(rows: list[Tensor]) -> Tensor:
    """A layer's input rows from this process's batches, joined with every process's in
    batch order (`parallel.block` gives each a run of them): the same rows, in the same
    order, however the batches were split."""
    return parallel.gather(torch.cat(rows))


def decompose_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (d, r) of A = R^T R from its rows R (m, d)
    alone, r = min(m, d): R^T = Q S by a reduced QR, so A = Q (S S^T) Q^T, and the
    eigenpairs of the r x r S S^T taken back through Q. A is 0 outside the rows' span,
    which `KroneckerCurvature.inverse` takes as such, as for `decompose`'s range; the
    work is about 3 d m^2 where forming A costs m d^2 and decomposing it 2 d^2 k more,
    and the memory m x d where A's is d x d."""
    Q, S = torch.linalg.qr(rows.T)
    values, vectors = torch.linalg.eigh(S @ S.T)
    return values, Q @ vectors


def decompose(factor: Tensor, rank_bound: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric PSD factor whose rank is at
    most `rank_bound`, as `torch.linalg.eigh` gives them, or of its range alone.

    A factor at least LOW_RANK_MIN wide and more than twice k = rank_bound + OVERSAMPLE is
    decomposed through its range (Halko et al. 2011, Algorithm 5.3): the range of the
    factor times a seeded Gaussian (d, k) sketch, orthonormalised by a QR; the
    eigendecomposition of the factor in that range, k wide, gives k eigenpairs (d, k),
    and the factor is 0 on the rest, which `KroneckerCurvature.inverse` takes as such.
    Measured on 2 cores in float32, d = 4,608: 3.1 s against eigh's 8.7 s on 1,295 rows,
    3.9 s against 7.3 s on 2,000 with the null space's basis completed, which the thin
    form no longer builds (a 10,001-wide input factor on 3,600 rows: 60 s to decompose
    that way, its basis 800 MB in float64). Its damped inverse is at least as near the
    float64 eigendecomposition's as a float32 eigh's (tested): its null space is exactly
    0, where eigh's rounding leaves noise."""
    d = factor.shape[0]
    if not keeps_range(d, rank_bound):
        return torch.linalg.eigh(factor)
    k = rank_bound + OVERSAMPLE
    generator = torch.Generator(device=factor.device).manual_seed(0)
    sketch = torch.randn(d, k, generator=generator, device=factor.device, dtype=factor.dtype)
    in_range, _ = torch.linalg.qr(factor @ sketch)
    small = in_range.T @ (factor @ in_range)
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    vectors = in_range @ vectors
    # The bound holds where each row adds one vector; a layer called twice in a forward
    # adds two. Checked on probes: a factor the sketch does not hold gets eigh.
    probe = torch.randn(d, 8, generator=generator, device=factor.device, dtype=factor.dtype)
    applied = factor @ probe
    if (applied - vectors @ (values[:, None] * (vectors.T @ probe))).norm() > (
        RANGE_TOLERANCE * applied.norm()
    ):
        return torch.linalg.eigh(factor)
    return values, vectors


def unfolds(layer: nn.Linear | nn.Conv2d) -> bool:
    """Whether curvlinops 3.0.1 can unfold the layer's input into its patches, as EK-FAC's
    refit and K-FAC-expand do: not a convolution with `padding='same'` over an even span
    (dilation x (kernel - 1) odd), which pads one more after than before."""
    if not isinstance(layer, nn.Conv2d) or layer.padding != "same":
        return True
    spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    return not any(span % 2 for span in spans)


def _check_ekfac_unfolds(layers: list[tuple[str, nn.Linear | nn.Conv2d]]) -> None:
    """EK-FAC's eigenvalue refit unfolds each convolution's input into patches, which
    curvlinops 3.0.1 does with equal padding on both sides only: `padding='same'` with an
    even span (dilation x (kernel - 1) odd) pads one more after than before, and it raises
    NotImplementedError there. K-FAC-reduce averages the patches another way and fits it."""
    for name, layer in layers:
        if isinstance(layer, nn.Conv2d) and not unfolds(layer):
            raise PumaError(
                f"--curvature ekfac cannot fit layer {name!r}: padding='same' with kernel "
                f"{tuple(layer.kernel_size)} pads unequally, which the EK-FAC refit cannot "
                "unfold; use --curvature kfac (or ggn), or an odd kernel"
            )


def _joint_eigenvalues(value: Tensor | dict[int, Tensor]) -> Tensor:
    """A layer's EK-FAC eigenvalues as one (out, in') tensor. curvlinops 3.0.1 keeps them
    as one tensor for a weight and bias taken together, and as a dict by parameter
    position for a layer without a bias (every convolution of ResNet-18 and DenseNet):
    then its one entry, the weight's."""
    if isinstance(value, Tensor):
        return value
    if len(value) != 1:
        raise PumaError(
            f"EK-FAC returned {len(value)} eigenvalue sets for one layer; use --curvature kfac"
        )
    return next(iter(value.values()))


def _batched_type2(base: type) -> type:
    """curvlinops' operator, its type-2 Fisher for cross-entropy computed for the whole batch
    at once: curvlinops 3.0.1 builds each row's Hessian square root in a Python loop, which
    was a third of a cold removal on a 2k-parameter MLP over 9,000 rows. The same S, with
    S S^T = diag(p) - p p^T row by row (tested equal to the library's own). Each row
    weighted by its class weight where the recipe has them (any Fisher type)."""

    class Batched(base):
        _fit_targets: list[Tensor] | None = None  # set by `_accumulate`
        _class_weight: Tensor | None = None  # set by `_fit`: the recipe's, (K,)
        _input_rows: dict[str, list[Tensor]] | None = None  # set by `_fit`: `through_rows`
        _expand: frozenset[str] = frozenset()  # set by `_fit`: `expanded_layers`
        _kfac_approx: Any  # curvlinops' KFACType, set by its __init__

        @contextmanager
        def _approximation(self, module_name: str) -> Iterator[None]:
            """Within it, the layer's factors are summed as K-FAC-expand where it is one of
            `_expand`, else as the operator's own (reduce)."""
            own = self._kfac_approx
            if module_name in self._expand:
                self._kfac_approx = type(own)("expand")
            try:
                yield
            finally:
                self._kfac_approx = own

        def _accumulate_gradient_covariance(
            self, grad_output: Tensor, module: nn.Module, module_name: str
        ) -> None:
            with self._approximation(module_name):
                super()._accumulate_gradient_covariance(grad_output, module, module_name)

        def _hook_accumulate_input_covariance(
            self, module: nn.Module, inputs: tuple[Tensor, ...], module_name: str
        ) -> None:
            """A layer in `_input_rows` keeps the rows of its inputs, scaled so that their
            Gram product R^T R is the factor curvlinops would sum: each row's input (its
            mean over positions, K-FAC-reduce's), a 1 appended for the bias, over the
            root of the fitting rows."""
            rows = self._input_rows
            if rows is None or module_name not in rows:
                with self._approximation(module_name):
                    return super()._hook_accumulate_input_covariance(module, inputs, module_name)
            x = inputs[0].detach()
            x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
            if "bias" in self._mapping[module_name]:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            rows[module_name].append(x / math.sqrt(self._N_data))
            return None

        def _compute_loss_and_backward(self, output: Tensor, y: Tensor) -> None:
            if self._class_weight is not None:
                # Each row's gradients at the layers' outputs scaled by the root of its
                # class weight, the output itself unchanged: every factor built from them
                # (the gradient covariances, EK-FAC's eigenvalues) takes the weight once.
                root = self._class_weight.to(output).index_select(0, y).sqrt()[:, None]
                output = output * root + (output * (1 - root)).detach()
            cross_entropy = isinstance(self._loss_func, nn.CrossEntropyLoss)
            if self._fisher_type != "type-2" or not cross_entropy or output.ndim != 2:
                return super()._compute_loss_and_backward(output, y)
            p = output.detach().softmax(dim=1)
            root = p.sqrt()
            S = torch.diag_embed(root) - p[:, :, None] * root[:, None, :]  # S[n, i, c]
            if self._loss_func.reduction == "mean":
                S.mul_(1.0 / output.shape[0])
            classes = S.shape[-1]
            # The factors need only the gradients at the layers' outputs (their hooks take
            # them on the way): a backward pass to the input computes those and no weight
            # gradient, a fifth less work on an MLP (see `_accumulate`).
            # A net that cuts its input from the graph (token ids cast to long for an
            # Embedding) leaves it unreached: no layer's hook then sees a gradient, and
            # the fit is made again through the weights (`fit_kronecker`).
            targets = self._fit_targets or self._params
            for c in range(classes):  # one backward pass per column, all rows at once
                torch.autograd.grad(
                    (output * S[:, :, c]).sum(),
                    targets,
                    retain_graph=c < classes - 1,
                    allow_unused=True,
                )
            return None

    Batched.__name__ = f"Batched{base.__name__}"
    return Batched


# The operator's attributes that hold K-FAC's factor sums (curvlinops 3.0.1).
FACTOR_SUMS = ("_input_covariances", "_gradient_covariances")


def _accumulate(
    operator: object,
    compute: Callable[[], None],
    batches: list[tuple[Tensor, Tensor]],
    mine: range,
    seed: int,
    through_input: bool,
    done: Callable[[int], None],
    sums: tuple[str, ...],
) -> None:
    """Run `compute` over this process's batches, `done(k)` after the k-th, and leave in the
    operator's `sums` attributes the totals over every process's batches.

    Each batch's share is added to a float64 total, summed over the processes in float64
    and only then given back in the operator's dtype: the totals do not depend on how the
    batches fall to processes or in what order they are added. In float32 they moved by
    about 1e-7, which turns the eigenbasis of a factor with eigenvalues that close (a
    convolution's patches: 2e-6 apart, relative, on a small image set) and with it
    EK-FAC's refitted eigenvalues, which belong to the basis: two processes' patch then
    differed from one's by 4 %. `through_input`: the backward passes go to each batch (the
    layers' output gradients, all the factors need, and no weight gradient); the model is
    given a copy, so that a forward writing into its input works and each pass sees the
    batch as it was."""
    totals: dict[str, dict[str, Any]] = {name: {} for name in sums}
    for k, i in enumerate(mine, 1):
        X, y = batches[i]
        start = X.detach().requires_grad_(True) if through_input and X.is_floating_point() else None
        operator._data = [(X if start is None else start.clone(), y)]  # type: ignore[attr-defined]
        operator._fit_targets = None if start is None else [start]  # type: ignore[attr-defined]
        operator._seed = seed + i  # type: ignore[attr-defined]
        for name in sums:
            setattr(operator, name, {})  # this batch's share alone
        compute()
        for name in sums:
            _add_float64(totals[name], getattr(operator, name))
        done(k)
    for name in sums:
        parallel_sum(totals[name])
        setattr(operator, name, _cast(totals[name], operator.dtype))  # type: ignore[attr-defined]


def _add_float64(total: dict[str, Any], share: dict[str, Any]) -> None:
    """total += share in float64, entry by entry ((nested) dicts of tensors)."""
    for key, value in share.items():
        if isinstance(value, dict):
            _add_float64(total.setdefault(key, {}), value)
        elif key in total:
            total[key].add_(value)  # added in float64
        else:
            total[key] = value.double()  # a copy (or the share itself, already float64)


def _cast(total: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        key: _cast(value, dtype) if isinstance(value, dict) else value.to(dtype)
        for key, value in total.items()
    }


def parallel_sum(factors: dict[str, object]) -> None:
    """All-reduce a (nested) dict of factor tensors in place (a no-op in one process)."""
    for value in factors.values():
        if isinstance(value, dict):
            parallel_sum(value)
        elif isinstance(value, Tensor):
            parallel.all_reduce(value)


def kronecker_from_tensors(
    kind: str,
    module: nn.Module,
    names: list[str],
    sizes: list[int],
    tensors: dict[str, Tensor],
    probe: Tensor,
) -> KroneckerCurvature | None:
    """The cached factors back as a curvature, or None when they do not fit the module
    (`probe`: a row or two of input, which tells the layers they were fitted for)."""
    factors: dict[str, tuple[Tensor, ...]] = {}
    with as_layers(module, kind):  # the layers the factors were fitted for
        layers = supported_layers(module, probe)
        for name, layer in layers:
            parts = tuple(tensors.get(f"{name}.{k}") for k in ("Qa", "Qb", "E"))
            if any(p is None for p in parts):
                return None
            Qa, Qb, E = (p.double() for p in parts if p is not None)
            cols = input_width(layer)
            rows = layer.weight.shape[0]
            k = Qa.shape[1] if Qa.ndim == 2 else 0  # the range's width, or all of it
            if Qa.shape != (cols, k) or not 0 < k <= cols:
                return None
            if Qb.shape != (rows, rows) or E.shape != (rows, k):
                return None
            # A NaN or inf anywhere makes the sum one: a pass with nothing allocated, where
            # isfinite(t).all() took 1.8 s over ResNet-18's (width 64) cached factors.
            if not all(math.isfinite(float(t.sum())) for t in (Qa, Qb, E)) or float(E.min()) < 0:
                return None
            factors[name] = (Qa, Qb, E)
        if not factors:
            return None
        curvature = _curvature(kind, module, layers, names, sizes, factors)
        curvature.expanded = frozenset(name for name in factors if f"{name}.expanded" in tensors)
        return curvature
