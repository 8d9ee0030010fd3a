"""curvlinops' K-FAC and EK-FAC operators as puma's fit drives them: the type-2 Fisher
for a whole batch at once, class weights, a wide layer's input rows kept, K-FAC-expand for
the layers `factor_layers.expanded_layers` picks (`batched_type2`), and the factor sums
taken a batch at a time in float64 and all-reduced over torchrun's processes
(`accumulate`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from puma_cli import parallel

Tensor = torch.Tensor


def batched_type2(base: type) -> type:
    """curvlinops' operator, its type-2 Fisher for cross-entropy computed for the whole batch
    at once: curvlinops 3.0.1 builds each row's Hessian square root in a Python loop, which
    was a third of a cold removal on a 2k-parameter MLP over 9,000 rows. The same S, with
    S S^T = diag(p) - p p^T row by row (tested equal to the library's own). Each row
    weighted by its class weight where the recipe has them (any Fisher type)."""

    class Batched(base):
        _fit_targets: list[Tensor] | None = None  # set by `accumulate`
        _class_weight: Tensor | None = None  # set by the fit: the recipe's, (K,)
        _input_rows: dict[str, list[Tensor]] | None = None  # set by the fit: `through_rows`
        _expand: frozenset[str] = frozenset()  # set by the fit: `expanded_layers`
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
            # gradient, a fifth less work on an MLP (see `accumulate`).
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


def accumulate(
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
