"""Inverse solvers: (C + mu I) x = b by CG (default), LiSSA or a dense solve, where C is the
engine's curvature (`engine.curvature`: the exact Hessian H, the GGN, or K-FAC/EK-FAC,
which are inverted in closed form instead).

mu is relative to H's largest eigenvalue (power iteration), because the scale of H
varies by orders of magnitude between datasets, and is raised when CG meets negative
curvature: a network's Hessian is indefinite, and too little damping explodes a patch.
Every solve runs in float64 with denormals flushed (`flush_denormals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.errors import PumaError, require_range

Tensor = torch.Tensor


SOLVERS = ("cg", "lissa", "exact")


EXACT_MAX_PARAMETERS = 6000
# The dense Hessian costs a backward pass of the gradient per parameter over every row
# (`hessian_matrix`; an HVP per parameter for the GGN): past about a million
# row-parameter products (some 5-10 s on a 2-core CPU) it is slower than retraining the
# models puma trains, and CG gets the same answer in tens of HVPs.
EXACT_MAX_WORK = 1_000_000


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


def curvature_product(engine: InfluenceModel) -> Callable[[Tensor], Tensor]:
    """v -> C v for the engine's curvature (weight decay included)."""
    if engine.kronecker is not None:  # set only for kfac/ekfac
        kron = engine.kronecker
        return lambda v: kron.matvec(v) + engine.weight_decay * v
    return engine.ggn_vp if engine.curvature == "ggn" else engine.hvp


def largest_curvature(engine: InfluenceModel, seed: int = 0) -> float:
    """C's largest eigenvalue: read off K-FAC's factors, else by power iteration."""
    if engine.kronecker is not None:  # set only for kfac/ekfac
        return engine.kronecker.lambda_max() + engine.weight_decay
    return largest_eigenvalue(
        curvature_product(engine), engine.n_parameters, engine.theta, seed=seed
    )


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
    on_iteration: Callable[[int], None] | None = None,
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
        if on_iteration is not None:
            on_iteration(iteration)
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


def dense_hessian(
    hvp: Callable[[Tensor], Tensor],
    size: int,
    like: Tensor,
    done: Callable[[int, int], None] = lambda k, total: None,
) -> Tensor:
    """H as a (P, P) matrix, one HVP per column (`done(k, P)` after the k-th), symmetrised."""
    eye = torch.eye(size, dtype=torch.float64, device=like.device)
    columns = []
    for i in range(size):
        columns.append(hvp(eye[i]))
        done(i + 1, size)
    H = torch.stack(columns, dim=1)
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
    require_range("--damping", damping, 0, low_open=True)
    if solver == "exact" and engine.n_parameters > EXACT_MAX_PARAMETERS:
        raise PumaError(
            f"--solver exact builds a {engine.n_parameters}x{engine.n_parameters} Hessian, too "
            f"large past {EXACT_MAX_PARAMETERS} parameters; use --solver cg"
        )
    if solver == "exact" and engine.n_parameters * engine.n > EXACT_MAX_WORK:
        raise PumaError(
            f"--solver exact needs {engine.n_parameters} Hessian-vector products over "
            f"{engine.n} rows ({engine.n_parameters * engine.n:,} row-parameter products, "
            f"limit {EXACT_MAX_WORK:,}): slower than retraining; use --solver cg"
        )
    top = lambda_max if lambda_max is not None else largest_curvature(engine)
    if top <= 0:
        raise PumaError(
            "the training loss has no curvature at these weights: the model fits every "
            "row to a loss of 0, so no row has an influence to remove, rank or correct. "
            "Imported weights trained on 8-bit images divided by 255 (torchvision's "
            "ToTensor) do so on the 0..255 values: import them again with --input-divisor "
            "255; otherwise a removal takes --method retrain"
        )
    if engine.kronecker is not None:  # set only for kfac/ekfac
        # Closed form: (K + (weight decay + mu) I)^-1 b, block by block.
        x = engine.kronecker.inverse(b, engine.weight_decay + damping * top)
        return Solve(x, damping, 0, 0.0)
    if solver == "exact":
        return _solve_exact(engine, b, damping, top)
    matvec = curvature_product(engine)
    share = damping
    for _ in range(8):
        mu = share * top
        try:
            if solver == "cg":
                x, iterations, residual = conjugate_gradient(
                    matvec, b, mu, tol, max_iter, _reporter(engine, max_iter)
                )
                if engine.phases is not None:
                    engine.phases("solve", max_iter, max_iter)
            else:
                x, iterations, residual = lissa(matvec, b, mu, 1.5 * (top + mu), tol, max_iter * 25)
            if not torch.isfinite(x).all():
                raise NegativeCurvature
            return Solve(x, share, iterations, residual)
        except NegativeCurvature:
            share *= 10
    raise PumaError("the Hessian stayed indefinite even with damping 1e8 x lambda_max")


def _reporter(engine: InfluenceModel, total: int) -> Callable[[int], None] | None:
    phases = engine.phases
    if phases is None:
        return None
    return lambda iteration: phases("solve", iteration, total)


def dense_curvature(engine: InfluenceModel) -> Tensor:
    """The engine's exact Hessian or GGN (weight decay included) as a dense (P, P) matrix:
    the Hessian a row per backward pass of the gradient (`hessian_matrix`), the GGN a
    product per column."""
    if engine.curvature == "ggn":
        tell = partial(engine.tell, "dense Hessian")
        return dense_hessian(engine.ggn_vp, engine.n_parameters, engine.theta, tell)
    return engine.hessian_matrix()


def _solve_exact(engine: InfluenceModel, b: Tensor, damping: float, top: float) -> Solve:
    # One dense matrix per engine: a command that solves twice builds it once.
    if engine.dense_eigh is None:
        H = dense_curvature(engine)
        eigenvalues, vectors = torch.linalg.eigh(H)
        engine.dense_eigh = (H, eigenvalues, vectors)
    H, eigenvalues, vectors = engine.dense_eigh
    share = damping
    while float(eigenvalues.min()) + share * top <= 1e-6 * top:
        share *= 10
    x = vectors @ ((vectors.T @ b) / (eigenvalues + share * top))
    residual = float((H @ x + share * top * x - b).norm() / (b.norm() or 1.0))
    return Solve(x, share, engine.n_parameters, residual)
