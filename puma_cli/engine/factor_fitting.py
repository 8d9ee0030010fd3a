"""K-FAC's and EK-FAC's factors for a module: fitted on batches of its rows
(`fit_kronecker`, through curvlinops' operator as `factor_sums.py` drives it), or read
back from the cache (`kronecker_from_tensors`), and laid out over theta as blocks
(`kronecker.KroneckerCurvature`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from puma_cli import parallel
from puma_cli.engine.attention import theta_name
from puma_cli.engine.factor_layers import (
    PROBE_ROWS,
    as_layers,
    expanded_layers,
    input_width,
    probed_layers,
    through_rows,
    unfolds,
)
from puma_cli.engine.factor_sums import FACTOR_SUMS, accumulate, batched_type2
from puma_cli.engine.kernels import composite_kernels, no_compiled_backward
from puma_cli.engine.kronecker import KINDS, Block, KroneckerCurvature, decompose, decompose_rows
from puma_cli.engine.stand_ins import tied_layers
from puma_cli.errors import PumaError

Tensor = torch.Tensor
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


def _positions(names: list[str], sizes: list[int]) -> dict[str, tuple[int, int]]:
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return {n: (int(o), int(s)) for n, o, s in zip(names, offsets, sizes, strict=True)}


def _left_out(
    module: nn.Module,
    names: list[str],
    sizes: list[int],
    covered: Tensor,
    without_gradient: AbstractSet[str] = frozenset(),
) -> dict[str, int]:
    """The parameters outside every block, counted by the class of the module holding them
    (`LayerNorm`, `Conv1d`, ...), so that a report can say which layers a patch leaves;
    `without_gradient`: the layers the network runs under torch.no_grad."""
    counts: dict[str, int] = {}
    tied = tied_layers(module)
    for name, (start, size) in _positions(names, sizes).items():
        if bool(covered[start : start + size].any()):
            continue
        owner, within, _ = name.partition(".parametrizations.")
        layer = owner if within else name.rpartition(".")[0]
        holder = module.get_submodule(layer)
        kind = type(holder).__name__
        if parametrize.is_parametrized(holder):  # weight_norm, spectral_norm: a computed weight
            kind = f"parametrized {kind.removeprefix('Parametrized')}"  # torch's subclass
        elif id(holder) in tied:  # shares a weight with another layer
            kind = f"tied {kind}"
        elif isinstance(holder, nn.Linear | nn.Conv2d):  # a layer K-FAC knows, left out:
            if not all(p.requires_grad for p in holder.parameters()):
                kind = f"partly frozen {kind}"
            elif layer in without_gradient:
                kind = f"{kind} run under no_grad"
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
    without_gradient: AbstractSet[str] = frozenset(),
) -> KroneckerCurvature:
    blocks, covered = _blocks(layers, names, sizes, factors)
    left_out = _left_out(module, names, sizes, covered, without_gradient)
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
    without_gradient: set[str] = set()
    probed = probed_layers(module, batches[0][0][:2], without_gradient)
    layers = [(name, layer) for name, layer, _ in probed]
    if not layers:
        scripted = any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())
        why = (
            "its layers are TorchScript (torch.jit.script), whose calls no hook sees: build "
            "the network unscripted, or use --curvature ggn or exact"
            if scripted
            else "each is frozen, parametrized as by weight_norm, tied to another layer's "
            "weight, or used by weight alone; use --curvature ggn or exact"
        )
        raise PumaError(
            f"--curvature {kind} approximates Linear, Conv1d and Conv2d layers, and this model "
            f"has none it can fit: {why}"
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

    with warnings.catch_warnings(), composite_kernels(module), no_compiled_backward():
        # curvlinops (and backpack, which it imports) warn about their own internals.
        warnings.simplefilter("ignore")
        from curvlinops import EKFACLinearOperator, KFACLinearOperator

        operator_class = batched_type2(
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
            accumulate(operator, compute, batches, mine, seed, through_input, after(0), FACTOR_SUMS)
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
            accumulate(
                operator, compute, batches, mine, seed, through_input, after(len(mine)),
                ("_corrected_eigenvalues",),
            )  # fmt: skip
        state = operator.state_dict()
    factors = _decomposed(kind, layers, state, inputs, total)
    curvature = _curvature(kind, module, layers, names, sizes, factors, without_gradient)
    curvature.covered = curvature.covered.to(curvature.blocks[0].E.device)
    curvature.from_rows = frozenset(by_rows)
    curvature.expanded = expand
    return curvature


def _decomposed(
    kind: str,
    layers: list[tuple[str, nn.Linear | nn.Conv2d]],
    state: dict[str, Any],
    inputs: dict[str, Tensor],
    total: int,
) -> dict[str, tuple[Tensor, ...]]:
    """Each layer's (Qa, Qb, E) in float64: the eigenbases of its input and output-gradient
    factors and the eigenvalues in their joint basis (K-FAC's products of the two factors'
    eigenvalues, EK-FAC's refit ones). A layer fitted through its rows (`inputs`) takes its
    input basis from them.

    Decomposed in the fit's dtype, as curvlinops decomposes EK-FAC's, and only then taken
    to float64: a float32 eigh costs half a float64 one (ResNet-18's 4,608-wide input
    factors: 9.2 s against 16.0 s each on 2 cores), and its errors (~1e-7 of the largest
    eigenvalue) lie far below the damping (1e-2 of it). On ResNet-18 (width 64, 1,295
    digits) a cold removal fell from 89 s to 64 s, its step within 1.2e-5. Every value
    stays one of the fit's dtype, so the cache holds them in it losslessly."""
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
    return factors


def _through_rows(layer: nn.Linear | nn.Conv2d, rows: int, kind: str, positions: int) -> bool:
    return through_rows(isinstance(layer, nn.Linear), input_width(layer), rows, kind, positions)


def _gathered_rows(rows: list[Tensor]) -> Tensor:
    """A layer's input rows from this process's batches, joined with every process's in
    batch order (`parallel.block` gives each a run of them): the same rows, in the same
    order, however the batches were split."""
    return parallel.gather(torch.cat(rows))


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
    without_gradient: set[str] = set()
    with as_layers(module, kind):  # the layers the factors were fitted for
        layers = [(n, m) for n, m, _ in probed_layers(module, probe, without_gradient)]
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
        curvature = _curvature(kind, module, layers, names, sizes, factors, without_gradient)
        curvature.expanded = frozenset(name for name in factors if f"{name}.expanded" in tensors)
        return curvature
