"""Derivatives of the training loss: gradients, Hessian-vector products, per-row scores.

Everything here works on the network's parameters as one flat float64 vector theta (P,).
J(theta) is the mean training loss over the rows still trained on, plus the recipe's
L2 term (weight_decay / 2 * |theta|^2, which Adam's weight_decay adds to the gradient);
H is its Hessian; `puma_cli.engine.solvers` inverts it (damped) against a vector.

Derivatives use plain autograd (double backward for HVPs, forward-mode duals for
directional derivatives): torch.func's transforms import torch._dynamo on first use,
which costs more than a whole removal on the sample data.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from puma_cli import parallel
from puma_cli.engine.kernels import (
    composite_kernels,
    derivatives_of_the_model,
    missing_derivative,
)
from puma_cli.engine.kronecker import KroneckerCurvature
from puma_cli.errors import PumaError
from puma_cli.models.predict import Phases, as_tensor

Tensor = torch.Tensor
Pair = tuple[Tensor, Tensor]
# Per-row gradients held at once (values; 64-128 MB): a chunk of rows of a large model's
# gradients, never all of them (SSD's importances, self-influence).
ROW_GRADIENT_VALUES = 2**24
SECOND_ORDER = "derivative of its backward, which the exact Hessian's products take"
SECOND_ORDER_FIX = "use --curvature ggn, kfac or ekfac, which need none"
REVERSE_ROUTE = "derivative of its backward"
REVERSE_FIX = (
    "the scores and the GGN's products need one where an op ({op}) has no forward-mode "
    "derivative: write those layers with torch operations that have either (remove's "
    "--method retrain, sisa, ssd and the fine-tuning baselines need neither)"
)


def _dual(primal: Tensor, tangent: Tensor) -> Tensor:
    """fwad.make_dual without the decompositions torch registers on a process's first call
    unless PYTORCH_JIT=0: TorchScript versions of the jvp of backward ops
    (nll_loss_backward, batch_norm_backward, ...), which forward-over-reverse needs and
    0.2-0.3 s of every process paid for (through torch.jit.script, which torch 2.13
    deprecates with a warning). Every forward-mode pass here differentiates a forward
    computation. The variable is set for this call only: TorchScript read it at import."""
    previous = os.environ.get("PYTORCH_JIT")
    os.environ["PYTORCH_JIT"] = "0"
    try:
        return fwad.make_dual(primal, tangent)
    finally:
        if previous is None:
            del os.environ["PYTORCH_JIT"]
        else:
            os.environ["PYTORCH_JIT"] = previous


def _figures(logits: Tensor, y: Tensor) -> Tensor:
    """(n, 2) float64: each row's cross-entropy (on the logits in float64) and whether the
    model predicts its label."""
    primal = logits.double()
    losses = F.cross_entropy(primal, y, reduction="none")
    return torch.stack([losses, (primal.argmax(1) == y).double()], dim=1)


class InfluenceModel:
    """A functional view of a classifier and the data its loss J is taken over.

    X: (n, *input_shape), y: (n,). Rows are processed in chunks of `chunk_size`.
    Derivatives are taken in `dtype` (float64 by default; float32 makes convolutions
    several times faster on a CPU); every vector going in or out of the public methods
    is float64, so the solvers' sums and dot products stay in float64.
    """

    def __init__(
        self,
        model: nn.Module,
        X: np.ndarray | Tensor,
        y: np.ndarray | Tensor,
        weight_decay: float = 0.0,
        chunk_size: int = 2048,
        dtype: torch.dtype = torch.float64,
        label_smoothing: float = 0.0,
        class_weights: tuple[float, ...] = (),
    ) -> None:
        device = next(model.parameters()).device
        self.dtype = dtype
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        # theta holds the parameters the model trains; frozen ones (requires_grad False,
        # as a user's class may set for a pretrained body) never learnt from the rows, so
        # they stay fixed like buffers: retraining leaves them where they are, too.
        everything = dict(self.module.named_parameters())
        named = {k: p for k, p in everything.items() if p.requires_grad}
        if not named:
            raise PumaError(
                "the model has no trainable parameters (every one has requires_grad False), "
                "so no training row has any influence on it: nothing to remove"
            )
        self.frozen = {k: p.detach() for k, p in everything.items() if not p.requires_grad}
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.sizes = [p.numel() for p in named.values()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in named.values()])
        # (H, eigenvalues, eigenvectors), built once by the dense solver when it is used.
        self.dense_eigh: tuple[Tensor, Tensor, Tensor] | None = None
        self.buffers = {k: b.detach() for k, b in self.module.named_buffers()}
        self.buffers.update(self.frozen)
        self.slots = tensor_slots(self.module)
        self.X = as_tensor(X, dtype, device) if isinstance(X, np.ndarray) else X.to(device, dtype)
        self.y = torch.as_tensor(y, dtype=torch.long, device=device)
        self.weight_decay = float(weight_decay)
        # The training loss's label smoothing (the recipe's): J's rows, their gradients,
        # scores and Hessian take it; the figures (`_figures`) and the held-out criterion
        # (`gradient_on`) stay the plain cross-entropy.
        self.label_smoothing = float(label_smoothing)
        # The recipe's class weights (K,), scaled to a mean of 1 over the engine's rows: a
        # row's loss is its class's weight x its cross-entropy, and the mean over the
        # rows, J's, is then torch's weighted mean, the loss the weights minimise (and its
        # weight decay in the same proportion). None: every row weighs 1.
        self.class_weight: Tensor | None = None
        if class_weights:
            weight = torch.tensor(class_weights, dtype=torch.float64, device=device)
            self.class_weight = (weight / weight[self.y].mean()).to(dtype)
        self.chunk_size = chunk_size
        self.device = device
        # Which curvature the solvers invert (`engine.curvature`): exact, ggn, kfac, ekfac.
        self.curvature = "exact"
        self.kronecker: KroneckerCurvature | None = None
        self.kronecker_cached = False
        self.phases: Phases | None = None  # told of each chunk of a long pass
        # The op without a forward-mode derivative that sent J v to the reverse route, once
        # a pass has met one (None: forward mode works, as far as the passes have gone).
        self.no_forward_mode: str | None = None
        self.curvature_note = ""  # why `auto` chose the curvature, where a report says so
        self.precision_note = ""  # why a small model's derivatives are float32, where so
        self.cost_note = ""  # where fitting K-FAC's factors cost more than training did

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def tell(self, phase: str, done: int, total: int) -> None:
        """Report progress of a long phase to the caller, when it asked (`phases`)."""
        if self.phases is not None:
            self.phases(phase, done, total)

    @property
    def n_parameters(self) -> int:
        return int(self.theta.numel())

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        return {
            name: part.view(shape)
            for name, part, shape in zip(
                self.names, torch.split(flat, self.sizes), self.shapes, strict=True
            )
        }

    def logits(self, flat: Tensor, X: Tensor) -> Tensor:
        """(n, K) logits at parameters `flat` (attention through composite ops)."""
        given = {**self.buffers, **self.params(flat)}
        values = {slot: given[first] for slot, first in self.slots.items()}
        with composite_kernels(self.module):
            return functional_call(self.module, values, (X,), tie_weights=False)

    def losses(self, flat: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Per-row training loss (n,) at parameters `flat` (no L2 term): the cross-entropy,
        label-smoothed as the model was trained."""
        return self._row_loss(self.logits(flat, X), y)

    def _row_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)
        return self._weighted(loss, y)

    def _weighted(self, per_row: Tensor, y: Tensor) -> Tensor:
        """`per_row` (n, ...) times each row's weight in J, its class's; as it is where the
        recipe weighs no class."""
        if self.class_weight is None:
            return per_row
        weight = self.class_weight.to(y.device).index_select(0, y.reshape(-1))
        return per_row * weight.reshape(-1, *(1,) * (per_row.ndim - 1))

    def _chunks(
        self,
        X: Tensor | None = None,
        y: Tensor | None = None,
        local: bool = False,
        size: int | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The rows in chunks of `size` (default `chunk_size`); with `local`, only this
        process's block of them under torchrun (`parallel.block`), whose sums the caller
        all-reduces."""
        X = self.X if X is None else X
        y = self.y if y is None else y
        size = size or self.chunk_size
        rows = self.local_rows(int(y.shape[0])) if local else range(int(y.shape[0]))
        for start in range(rows.start, rows.stop, size):
            stop = min(start + size, rows.stop)
            yield X[start:stop], y[start:stop]

    @staticmethod
    def local_rows(count: int) -> range:
        """This process's contiguous block of `count` rows (all of them in one process)."""
        return parallel.block(count, f"{count} rows", idle_ok=True)

    def objective(self, flat: Tensor) -> Tensor:
        """J(theta): mean loss over the rows plus weight_decay / 2 * |theta|^2 (differentiable,
        every row in this process: the reference the tests take exact Hessians of)."""
        total = sum(self.losses(flat, X, y).sum() for X, y in self._chunks())
        return total / self.n + 0.5 * self.weight_decay * flat.dot(flat)

    def _leaf(self) -> Tensor:
        return self.theta.detach().requires_grad_(True)

    def hvp(self, v: Tensor) -> Tensor:
        """H v, the undamped Hessian of J times v (P,), by double backward."""
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        v_in = v.to(self.dtype)
        for X, y in self._chunks(local=True):
            theta = self._leaf()
            with derivatives_of_the_model(SECOND_ORDER, SECOND_ORDER_FIX):
                loss = self.losses(theta, X, y).sum()
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                (hv,) = torch.autograd.grad(g.dot(v_in), theta)
            out += hv.double()
        return parallel.all_reduce(out) / self.n + self.weight_decay * v

    def hessian_matrix(self, phase: str = "dense Hessian") -> Tensor:
        """H as a dense (P, P) float64 matrix, symmetrised: what `hvp` gives column by
        column, with each chunk's forward and first backward pass taken once and its
        gradient differentiated once a row of H (`hvp` per column repeats the first two
        P times: 13.8 s against 8.1 s on a 2,338-parameter MLP over 900 rows). Tells
        `phase` after each row of each chunk."""
        size = self.n_parameters
        H = torch.zeros(size, size, dtype=torch.float64, device=self.device)
        chunks = list(self._chunks(local=True))
        total = len(chunks) * size
        for c, (X, y) in enumerate(chunks):
            theta = self._leaf()
            with derivatives_of_the_model(SECOND_ORDER, SECOND_ORDER_FIX):
                loss = self.losses(theta, X, y).sum()
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                for i in range(size):
                    (row,) = torch.autograd.grad(g[i], theta, retain_graph=i + 1 < size)
                    H[i] += row.double()
                    self.tell(phase, c * size + i + 1, total)
        H = parallel.all_reduce(H) / self.n
        H.diagonal().add_(self.weight_decay)
        return 0.5 * (H + H.T)

    def ggn_vp(self, v: Tensor) -> Tensor:
        """G v, the Gauss-Newton matrix of J times v (P,): mean_i J_i^T H_i J_i v, with J_i
        the Jacobian of row i's logits and H_i = diag(p_i) - p_i p_i^T the cross-entropy's
        Hessian in the logits (times the row's class weight), plus the weight decay.
        Positive semi-definite, unlike H: the curvature that stays meaningful where the
        model interpolates. One forward-mode pass (J v) and one backward pass (J^T) per
        chunk."""
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        v_in = v.to(self.dtype)
        for X, y in self._chunks(local=True):
            logits, jv = self._forward_or_reverse(
                partial(self._logits_jv_forward, v_in, X), partial(self._logits_jv_reverse, v_in, X)
            )
            p = torch.softmax(logits, dim=1)
            hjv = self._weighted(p * jv - p * (p * jv).sum(dim=1, keepdim=True), y)
            theta = self._leaf()
            (gv,) = torch.autograd.grad((self.logits(theta, X) * hjv).sum(), theta)
            out += gv.double()
        return parallel.all_reduce(out) / self.n + self.weight_decay * v

    def _logits_jv_forward(self, v: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
        """The logits (n, K) at theta and J v, their derivative along v: one forward-mode
        pass."""
        with torch.no_grad(), fwad.dual_level():
            dual = fwad.unpack_dual(self.logits(_dual(self.theta, v), X))
            return dual.primal, dual.tangent

    def _logits_jv_reverse(self, v: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
        """The same by two reverse passes, for a model with an op that has no forward-mode
        derivative (`grid_sample`, a custom autograd.Function without jvp): g(u) = J^T u is
        linear in u, so the gradient of g(u) . v in u is J v. 1.5x the forward-mode pass's
        time in float32 on the digits CNN, 2.8x in float64."""
        with torch.enable_grad():
            theta = self._leaf()
            logits = self.logits(theta, X)
            u = torch.zeros_like(logits, requires_grad=True)
            (g,) = torch.autograd.grad((logits * u).sum(), theta, create_graph=True)
            (jv,) = torch.autograd.grad(g.dot(v), u)
        return logits.detach(), jv

    def _forward_or_reverse(self, forward: Callable[[], Pair], reverse: Callable[[], Pair]) -> Pair:
        """forward() until the model meets an op without a forward-mode derivative, then
        reverse() for this engine's every pass."""
        if self.no_forward_mode is None:
            try:
                return forward()
            except (NotImplementedError, RuntimeError) as exc:
                self.no_forward_mode = missing_derivative(exc)
                if self.no_forward_mode is None:
                    raise
        fix = REVERSE_FIX.format(op=self.no_forward_mode)
        with derivatives_of_the_model(REVERSE_ROUTE, fix):
            return reverse()

    def weighted_gradient(
        self, weights: Tensor, X: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """sum_i w_i grad L_i (P,) over the rows (or over X, y, one weight each): one
        backward pass, no per-row gradients."""
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        rows = self.local_rows(int((self.y if y is None else y).shape[0]))
        start, chunks = rows.start, -(-len(rows) // self.chunk_size)
        for i, (Xc, yc) in enumerate(self._chunks(X, y, local=True)):
            w = weights[start : start + yc.shape[0]].to(self.dtype)
            start += int(yc.shape[0])
            theta = self._leaf()
            loss = (w * self.losses(theta, Xc.to(self.dtype), yc)).sum()
            out += torch.autograd.grad(loss, theta)[0].double()
            self.tell("gradients", i + 1, chunks)
        return parallel.all_reduce(out)

    def gradient_at(self, positions: np.ndarray, weights: np.ndarray | Tensor) -> Tensor:
        """sum_i w_i grad L_i (P,) over the engine's rows at `positions`, one weight each."""
        at = torch.as_tensor(positions, device=self.device)
        w = torch.as_tensor(weights, device=self.device)
        return self.weighted_gradient(w, self.X[at], self.y[at])

    def directional_derivatives(
        self, v: Tensor, X: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """g_i . v for every row (n,): one forward-mode pass along v, no per-row gradients
        (each process takes its block of rows; the scores are gathered back in order)."""
        return self.scores_and_figures(v, X, y)[0]

    def scores_and_figures(
        self, v: Tensor, X: Tensor | None = None, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`directional_derivatives`, and the model's figures on each row from the same
        pass's primal logits (n, 2) float64: its cross-entropy (on the logits in float64)
        and whether it predicts the label. For a float32 engine they are the figures of the
        float32 model a removal writes, at no cost beside the scores."""
        return self._forward_or_reverse(
            partial(self._scores_forward, v, X, y), partial(self._scores_reverse, v, X, y)
        )

    def _scores_forward(
        self, v: Tensor, X: Tensor | None, y: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        parts = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        figures = [torch.zeros((0, 2), dtype=torch.float64, device=self.device)]
        chunks = self._chunk_count(y)
        with torch.no_grad(), fwad.dual_level():
            theta = _dual(self.theta, v.to(self.dtype))
            for i, (Xc, yc) in enumerate(self._chunks(X, y, local=True)):
                logits = self.logits(theta, Xc.to(self.dtype))
                parts.append(fwad.unpack_dual(self._row_loss(logits, yc)).tangent)
                figures.append(_figures(fwad.unpack_dual(logits).primal, yc))
                self.tell("scores", i + 1, chunks)
        return parallel.gather(torch.cat(parts).double()), parallel.gather(torch.cat(figures))

    def _scores_reverse(
        self, v: Tensor, X: Tensor | None, y: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The scores from J v of the logits by the reverse route: the cross-entropy's
        derivative in the logits is softmax - target (the one-hot label, smoothed as the
        model was trained), times the row's class weight."""
        parts = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        figures = [torch.zeros((0, 2), dtype=torch.float64, device=self.device)]
        chunks = self._chunk_count(y)
        v_in = v.to(self.dtype)
        for i, (Xc, yc) in enumerate(self._chunks(X, y, local=True)):
            logits, jv = self._logits_jv_reverse(v_in, Xc.to(self.dtype))
            k, smooth = logits.shape[1], self.label_smoothing
            target = F.one_hot(yc, k).to(jv.dtype) * (1 - smooth) + smooth / k
            slope = torch.softmax(logits, dim=1) - target
            parts.append(self._weighted((slope * jv).sum(dim=1), yc))
            figures.append(_figures(logits, yc))
            self.tell("scores", i + 1, chunks)
        return parallel.gather(torch.cat(parts).double()), parallel.gather(torch.cat(figures))

    def _chunk_count(self, y: Tensor | None) -> int:
        rows = self.local_rows(int((self.y if y is None else y).shape[0]))
        return max(1, -(-len(rows) // self.chunk_size))

    def per_sample_gradients(
        self, X: Tensor | None = None, y: Tensor | None = None, phase: str | None = None
    ) -> Tensor:
        """The (n, P) matrix of per-row loss gradients, by vmap over grad (chunked); for a
        model vmap cannot batch (a GRU's state written in place, a custom
        autograd.Function without setup_context), one backward pass per row."""
        parts = [part.double() for part in self.per_row_gradients(X, y, phase)]
        if not parts:
            return torch.zeros((0, self.n_parameters), dtype=torch.float64, device=self.device)
        return torch.cat(parts)

    def per_row_gradients(
        self,
        X: Tensor | None = None,
        y: Tensor | None = None,
        phase: str | None = None,
    ) -> Iterator[Tensor]:
        """The per-row loss gradients chunk by chunk, (rows, P) in the engine's dtype, the
        rows in order, at most ROW_GRADIENT_VALUES values a chunk (one row at least), so
        that a large model's gradients never stand all at once."""
        from torch.func import grad, vmap  # imports torch._dynamo: only where asked for

        def single(flat: Tensor, x: Tensor, target: Tensor) -> Tensor:
            return self.losses(flat, x[None], target[None])[0]

        per_row = vmap(grad(single), in_dims=(None, 0, 0))
        step = max(1, min(self.chunk_size, ROW_GRADIENT_VALUES // max(self.n_parameters, 1)))
        chunks = -(-int((self.y if y is None else y).shape[0]) // step)
        batched = True  # until vmap fails once: then row by row for the remaining chunks
        for i, (Xc, yc) in enumerate(self._chunks(X, y, size=step)):
            Xc = Xc.to(self.dtype)
            part = None
            if batched:
                try:
                    part = per_row(self.theta, Xc, yc)
                except (RuntimeError, NotImplementedError):
                    batched = False
            if part is None:
                part = self._row_by_row(Xc, yc)
            if phase is not None:
                self.tell(phase, i + 1, chunks)
            yield part

    def _row_by_row(self, X: Tensor, y: Tensor) -> Tensor:
        rows = []
        for i in range(int(y.shape[0])):
            theta = self._leaf()
            (g,) = torch.autograd.grad(self.losses(theta, X[i : i + 1], y[i : i + 1])[0], theta)
            rows.append(g)
        return torch.stack(rows)  # a chunk holds one row at least

    def gradient_on(
        self, X: Tensor, y: Tensor, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> Tensor:
        """Gradient (P,) of a criterion on other data: criterion(logits, y) -> scalar,
        the mean cross-entropy unless given.

        In chunks, so that memory holds one chunk's activations (a 5,000-image validation
        split of a ResNet-18 in one batch took 6 GB). The mean cross-entropy is a sum over
        rows: one forward and backward pass per chunk. Another criterion (calibrate's ECE)
        need not be: the logits of every row first (no graph), its gradient in them, then
        J^T of that chunk by chunk."""
        X = X.to(self.dtype)
        n = int(X.shape[0])
        pieces = [(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)]
        if criterion is None:
            out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
            for i, (a, b) in enumerate(pieces):
                theta = self._leaf()
                loss = F.cross_entropy(self.logits(theta, X[a:b]), y[a:b], reduction="sum")
                out += torch.autograd.grad(loss / n, theta)[0].double()
                self.tell("held-out gradient", i + 1, len(pieces))
            return out
        pieces = pieces or [(0, 0)]
        with torch.no_grad():
            logits = torch.cat([self.logits(self.theta, X[a:b]) for a, b in pieces])
        logits.requires_grad_(True)
        (upstream,) = torch.autograd.grad(criterion(logits, y), logits)
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        # The gradient of a scalar: passing `upstream` as grad_outputs would make torch
        # import sympy for its shape check, 0.5 s of every process's first request.
        for i, (a, b) in enumerate(pieces):
            theta = self._leaf()
            value = (self.logits(theta, X[a:b]) * upstream[a:b]).sum()
            (part,) = torch.autograd.grad(value, theta)
            out += part.double()
            self.tell("held-out gradient", i + 1, len(pieces))
        return out

    def patched_module(self, delta: Tensor) -> nn.Module:
        """A float32 copy of the module with theta + delta as its parameters."""
        module = copy.deepcopy(self.module).double()
        with torch.no_grad():
            theta = self.theta.double() + delta
            named = dict(module.named_parameters())
            for name, part in zip(self.names, torch.split(theta, self.sizes), strict=True):
                named[name].copy_(part.view(named[name].shape))
        return module.float()


def tensor_slots(module: nn.Module) -> dict[str, str]:
    """Each place a parameter or buffer is held, once, by a name of it -> the name
    `named_parameters()` / `named_buffers()` give its tensor.

    A layer reachable under two names (`self.b = self.a`) is one place; a parameter given
    to two layers (`self.head.weight = self.embed.weight`) is two places of one tensor.
    `functional_call` is given each place once, tied ones the same tensor, with its own
    tying off: in torch 2.13 that tying leaves a layer held under two names with the call's
    tensors in place of its weights (pytorch/pytorch#164759).
    """
    tensors: dict[int, str] = {}
    places: set[tuple[int, str]] = set()
    slots: dict[str, str] = {}
    named = (
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        owner, _, attr = name.rpartition(".")
        place = (id(module.get_submodule(owner)), attr)
        if place in places:
            continue
        places.add(place)
        slots[name] = tensors.setdefault(id(tensor), name)
    return slots
