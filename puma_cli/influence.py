"""The influence engine: gradients, Hessian-vector products and inverse-HVP solvers.

Everything here works on the network's parameters as one flat float64 vector theta (P,).
J(theta) is the mean training loss over the rows still trained on, plus the recipe's
L2 term (weight_decay / 2 * |theta|^2, which Adam's weight_decay adds to the gradient);
H is its Hessian, damped as H + mu * I with mu relative to H's largest eigenvalue
because the scale of H varies by orders of magnitude between datasets.

Derivatives use plain autograd (double backward for HVPs, forward-mode duals for
directional derivatives): torch.func's transforms import torch._dynamo on first use,
which costs more than a whole removal on the sample data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from puma_cli.errors import PumaError

Tensor = torch.Tensor
SOLVERS = ("cg", "lissa", "exact")
EXACT_MAX_PARAMETERS = 6000


def _flushing() -> bool:
    tiny = torch.tensor([1e-300], dtype=torch.float64)
    return bool((tiny * 1e-10).item() == 0.0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero inside the block, and restore the caller's setting.

    Probabilities that underflow to denormals made HVPs about 10x slower; the setting is
    process-wide, so it is switched on only while the engine works.
    """
    before = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@dataclass(frozen=True)
class Solve:
    """x ~ (H + mu I)^-1 b, with how it was reached."""

    x: Tensor
    damping: float
    iterations: int
    residual: float


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
    ) -> None:
        device = next(model.parameters()).device
        self.dtype = dtype
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        named = dict(self.module.named_parameters())
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.sizes = [p.numel() for p in named.values()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in named.values()])
        self.buffers = {k: b.detach() for k, b in self.module.named_buffers()}
        self.X = torch.as_tensor(X, dtype=dtype, device=device)
        self.y = torch.as_tensor(y, dtype=torch.long, device=device)
        self.weight_decay = float(weight_decay)
        self.chunk_size = chunk_size
        self.device = device

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

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
        """(n, K) logits at parameters `flat`."""
        return functional_call(self.module, (self.params(flat), self.buffers), (X,))

    def losses(self, flat: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Per-row cross-entropy (n,) at parameters `flat` (no L2 term)."""
        return F.cross_entropy(self.logits(flat, X), y, reduction="none")

    def _chunks(
        self, X: Tensor | None = None, y: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        X = self.X if X is None else X
        y = self.y if y is None else y
        for start in range(0, int(y.shape[0]), self.chunk_size):
            yield X[start : start + self.chunk_size], y[start : start + self.chunk_size]

    def objective(self, flat: Tensor) -> Tensor:
        """J(theta): mean loss over the rows plus weight_decay / 2 * |theta|^2."""
        total = sum(self.losses(flat, X, y).sum() for X, y in self._chunks())
        return total / self.n + 0.5 * self.weight_decay * flat.dot(flat)

    def _leaf(self) -> Tensor:
        return self.theta.detach().requires_grad_(True)

    def hvp(self, v: Tensor) -> Tensor:
        """H v, the undamped Hessian of J times v (P,), by double backward."""
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        v_in = v.to(self.dtype)
        for X, y in self._chunks():
            theta = self._leaf()
            (g,) = torch.autograd.grad(self.losses(theta, X, y).sum(), theta, create_graph=True)
            (hv,) = torch.autograd.grad(g.dot(v_in), theta)
            out += hv.double()
        return out / self.n + self.weight_decay * v

    def weighted_gradient(self, weights: Tensor) -> Tensor:
        """sum_i w_i grad L_i (P,) over the rows: one backward pass, no per-row gradients."""
        out = torch.zeros(self.theta.shape, dtype=torch.float64, device=self.device)
        start = 0
        for X, y in self._chunks():
            w = weights[start : start + y.shape[0]].to(self.dtype)
            start += int(y.shape[0])
            theta = self._leaf()
            out += torch.autograd.grad((w * self.losses(theta, X, y)).sum(), theta)[0].double()
        return out

    def directional_derivatives(
        self, v: Tensor, X: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """g_i . v for every row (n,): one forward-mode pass along v, no per-row gradients."""
        parts = []
        with torch.no_grad(), fwad.dual_level():
            theta = fwad.make_dual(self.theta, v.to(self.dtype))
            for Xc, yc in self._chunks(X, y):
                parts.append(fwad.unpack_dual(self.losses(theta, Xc.to(self.dtype), yc)).tangent)
        return torch.cat(parts).double()

    def per_sample_gradients(self, X: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """The (n, P) matrix of per-row loss gradients, by vmap over grad (chunked)."""
        from torch.func import grad, vmap  # imports torch._dynamo: only where asked for

        def single(flat: Tensor, x: Tensor, target: Tensor) -> Tensor:
            return self.losses(flat, x[None], target[None])[0]

        per_row = vmap(grad(single), in_dims=(None, 0, 0))
        parts = [per_row(self.theta, Xc.to(self.dtype), yc) for Xc, yc in self._chunks(X, y)]
        return torch.cat(parts).double()

    def gradient_on(
        self, X: Tensor, y: Tensor, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> Tensor:
        """Gradient (P,) of a criterion on other data: criterion(logits, y) -> scalar,
        the mean cross-entropy unless given."""
        theta = self._leaf()
        logits = self.logits(theta, X.to(self.dtype))
        value = criterion(logits, y) if criterion is not None else F.cross_entropy(logits, y)
        return torch.autograd.grad(value, theta)[0].double()

    def patched_module(self, delta: Tensor) -> nn.Module:
        """A float32 copy of the module with theta + delta as its parameters."""
        module = copy.deepcopy(self.module).double()
        with torch.no_grad():
            theta = self.theta.double() + delta
            for p, part in zip(module.parameters(), torch.split(theta, self.sizes), strict=True):
                p.copy_(part.view(p.shape))
        return module.float()


# --- spectrum and solvers ----------------------------------------------------------------


def largest_eigenvalue(
    hvp: Callable[[Tensor], Tensor], size: int, like: Tensor, iterations: int = 30, seed: int = 0
) -> float:
    """|lambda|_max of H by power iteration (the dominant eigenvalue is positive at a minimum)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=generator, dtype=torch.float64).to(like.device)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = hvp(v)
        new = float(v.dot(w))
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
        if abs(new - value) <= 1e-4 * abs(new):
            value = new
            break
        value = new
    return abs(value)


class NegativeCurvature(Exception):
    """CG met a direction p with p^T (H + mu I) p <= 0: the damping is too small."""


def conjugate_gradient(
    hvp: Callable[[Tensor], Tensor],
    b: Tensor,
    damping: float,
    tol: float = 1e-4,
    max_iter: int = 200,
) -> tuple[Tensor, int, float]:
    """Solve (H + damping I) x = b; stops at |r| <= tol |b|. Raises NegativeCurvature."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r.dot(r))
    b_norm = math.sqrt(float(b.dot(b))) or 1.0
    for iteration in range(1, max_iter + 1):
        Ap = hvp(p) + damping * p
        curvature = float(p.dot(Ap))
        if curvature <= 0:
            raise NegativeCurvature
        alpha = rs / curvature
        x += alpha * p
        r -= alpha * Ap
        rs_new = float(r.dot(r))
        if math.sqrt(rs_new) <= tol * b_norm:
            return x, iteration, math.sqrt(rs_new) / b_norm
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, max_iter, math.sqrt(rs) / b_norm


def lissa(
    hvp: Callable[[Tensor], Tensor],
    b: Tensor,
    damping: float,
    scale: float,
    tol: float = 1e-4,
    max_iter: int = 5000,
) -> tuple[Tensor, int, float]:
    """LiSSA (Agarwal et al.), full-batch: h <- b + (I - (H + mu I)/scale) h; x = h / scale.

    Converges when scale exceeds the largest eigenvalue of H + mu I and H + mu I is positive.
    """
    h = b.clone()
    b_norm = float(b.norm()) or 1.0
    iteration = 0
    while iteration < max_iter:
        iteration += 1
        Ah = hvp(h) + damping * h
        new = b + h - Ah / scale
        # A negative eigenvalue of H + mu I makes the recursion grow without bound.
        if not torch.isfinite(new).all() or float(new.norm()) > 1e8 * b_norm:
            raise NegativeCurvature
        step = float((new - h).norm())
        h = new
        if step <= tol * b_norm:
            break
    x = h / scale
    residual = float((hvp(x) + damping * x - b).norm()) / b_norm
    if residual > 1e-2:
        raise NegativeCurvature  # not converged: more damping makes it converge faster
    return x, iteration, residual


def dense_hessian(hvp: Callable[[Tensor], Tensor], size: int, like: Tensor) -> Tensor:
    """H as a (P, P) matrix, one HVP per column, symmetrised."""
    eye = torch.eye(size, dtype=torch.float64, device=like.device)
    H = torch.stack([hvp(eye[i]) for i in range(size)], dim=1)
    return 0.5 * (H + H.T)


def solve(
    engine: InfluenceModel,
    b: Tensor,
    solver: str = "cg",
    damping: float = 0.01,
    lambda_max: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
) -> Solve:
    """x = (H + mu I)^-1 b with mu = damping * lambda_max, raised tenfold at negative curvature."""
    if solver not in SOLVERS:
        raise PumaError(f"--solver {solver!r}: choose cg, lissa or exact")
    if damping <= 0:
        raise PumaError(f"--damping {damping}: give a positive share of the largest eigenvalue")
    if solver == "exact" and engine.n_parameters > EXACT_MAX_PARAMETERS:
        raise PumaError(
            f"--solver exact builds a {engine.n_parameters}x{engine.n_parameters} Hessian, too "
            f"large past {EXACT_MAX_PARAMETERS} parameters; use --solver cg"
        )
    top = (
        lambda_max
        if lambda_max is not None
        else largest_eigenvalue(engine.hvp, engine.n_parameters, engine.theta)
    )
    if top <= 0:
        raise PumaError("the Hessian of the training loss is zero; the model has nothing to remove")
    if solver == "exact":
        return _solve_exact(engine, b, damping, top)
    share = damping
    for _ in range(8):
        mu = share * top
        try:
            if solver == "cg":
                x, iterations, residual = conjugate_gradient(engine.hvp, b, mu, tol, max_iter)
            else:
                x, iterations, residual = lissa(
                    engine.hvp, b, mu, 1.5 * (top + mu), tol, max_iter * 25
                )
            if not torch.isfinite(x).all():
                raise NegativeCurvature
            return Solve(x, share, iterations, residual)
        except NegativeCurvature:
            share *= 10
    raise PumaError("the Hessian stayed indefinite even with damping 1e8 x lambda_max")


def _solve_exact(engine: InfluenceModel, b: Tensor, damping: float, top: float) -> Solve:
    H = dense_hessian(engine.hvp, engine.n_parameters, engine.theta)
    eigenvalues, vectors = torch.linalg.eigh(H)
    share = damping
    while float(eigenvalues.min()) + share * top <= 1e-6 * top:
        share *= 10
    x = vectors @ ((vectors.T @ b) / (eigenvalues + share * top))
    residual = float((H @ x + share * top * x - b).norm() / (b.norm() or 1.0))
    return Solve(x, share, engine.n_parameters, residual)
