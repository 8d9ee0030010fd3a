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

This module holds the curvature once fitted and its decompositions. Which layers get
factors, and whether as K-FAC-reduce or -expand: `factor_layers.py`. The fit, by
`curvlinops-for-pytorch` (pinned; it handles the hooks, the unfolding of convolutions and
the sampling of labels) on a subsample of the training rows, once per model, and the
factors cached beside it (`<stem>.factors.safetensors`, in the dtype they were fitted
in) read back: `factor_fitting.py`; curvlinops' operator as the fit drives it:
`factor_sums.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
KINDS = ("kfac", "ekfac")

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
