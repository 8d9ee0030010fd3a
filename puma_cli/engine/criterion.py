"""v = (C + mu I)^-1 grad C: solved once per model and criterion, cached beside the checkpoint
(the curvature C is the engine's: `engine.curvature`).

Removal (Algorithm 1) and label debugging (Algorithm 2) both start from it. The cache,
`<stem>.influence.safetensors`, holds v and the damping that worked, keyed by the
checkpoint's and the criterion data's sha256, the criterion's row ids and the solver
settings; a cache that does
not match, cannot be read or fails its check is rebuilt (`io.cache`), and one that cannot
be written only costs time. Beside v it keeps what was computed so far per trained row,
NaN where nothing was asked for: the scores psi_i = v . g_i (`scores`) and the removal
guard's figures of the original model. Neither depends on which points a request marks,
so a later request computes only rows no earlier one did (`per_row`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.engine.derivatives import InfluenceModel, Phases
from puma_cli.engine.solvers import largest_curvature, solve
from puma_cli.engine.training_engine import (
    SolverSettings,
    training_engine,
)
from puma_cli.io.atomic import sha256_file
from puma_cli.io.cache import Cache, Check
from puma_cli.io.checkpoint import Checkpoint
from puma_cli.models.predict import as_tensor


@dataclass
class CriterionDirection:
    """v (P,) float64, H's largest eigenvalue, the damping share used, whether it was cached;
    the per-row values known so far (by name, PER_ROW: float64, one row per engine row,
    NaN where unknown) and the cache metadata they are staged under (None: no cache)."""

    v: torch.Tensor
    grad_c: torch.Tensor
    lambda_max: float
    damping: float
    cached: bool
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, str] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # SUMS: (P,) float64


# name: columns (1: a vector). in+ / in-: 1 for the rows in sum+ / sum- (SUMS), else 0.
PER_ROW = {"psi": 1, "fit0": 2, "in+": 1, "in-": 1}
SUMS = {"sum+": "in+", "sum-": "in-"}  # sum of psi_j g_j over the rows a mask holds


def cache_path_for(checkpoint: Path) -> Path:
    """m.safetensors -> m.influence.safetensors."""
    return checkpoint.with_name(f"{checkpoint.stem}.influence.safetensors")


def factor_cache_path_for(checkpoint: Path) -> Path:
    """m.safetensors -> m.factors.safetensors: the fitted K-FAC or EK-FAC factors."""
    return checkpoint.with_name(f"{checkpoint.stem}.factors.safetensors")


@dataclass
class EngineCaches:
    """The two caches beside a model: the solved v and the curvature's factors."""

    direction: Cache | None
    factors: Cache | None

    @classmethod
    def beside(cls, model: Path, use: bool = True) -> EngineCaches:
        if not use:
            return cls(None, None)
        return cls(Cache(cache_path_for(model)), Cache(factor_cache_path_for(model)))

    def all(self) -> list[Cache | None]:
        return [self.direction, self.factors]


def engine_and_direction(
    checkpoint: Checkpoint,
    dataset: Dataset,
    rows: np.ndarray,
    criterion: Dataset,
    settings: SolverSettings,
    caches: EngineCaches,
    phases: Phases | None = None,
) -> tuple[InfluenceModel, CriterionDirection]:
    """The engine over `rows` with its curvature, and v = C^-1 grad C on `criterion`."""
    engine = training_engine(
        checkpoint,
        dataset,
        rows,
        settings.precision,
        settings=settings,
        factor_cache=caches.factors,
        phases=phases,
    )
    return engine, criterion_direction(engine, checkpoint, criterion, settings, caches.direction)


def criterion_direction(
    engine: InfluenceModel,
    checkpoint: Checkpoint,
    criterion: Dataset,
    settings: SolverSettings,
    cache: Cache | None,
    at_least: float = 0.0,
    previous: CriterionDirection | None = None,
) -> CriterionDirection:
    """grad C on the criterion data and v = H^-1 grad C, from the cache when it fits.

    `at_least` is a damping share the caller has raised the requested one to (a removal
    whose every step broke the model), `previous` the direction it had before: its grad C
    and eigenvalue are reused, and the solve starts at `at_least`. The cache, still keyed
    by the requested damping, records the share used, so the next request starts there.
    A fresh solve is staged in `cache`, grad C with it (a forward and backward pass over
    the criterion split: 5,000 images of a ResNet-18 cost more than the rest of a cached
    request); the job commits it once its outputs are written."""
    key = _cache_key(checkpoint, criterion, settings, engine) if cache is not None else {}
    if cache is not None:
        hit = cache.load(key, _check_direction(engine.n_parameters, engine.n))
        if hit is not None and float(hit[1]["damping_used"]) >= at_least:
            tensors, meta = hit
            v, grad_c = (tensors[name].to(engine.device) for name in ("v", "grad_c"))
            top, damping = float(meta["lambda_max"]), float(meta["damping_used"])
            rows = {name: tensors[name].numpy().copy() for name in PER_ROW if name in tensors}
            sums = {
                name: tensors[name].to(engine.device)
                for name, mask in SUMS.items()
                if name in tensors and mask in rows
            }
            return CriterionDirection(v, grad_c.double(), top, damping, True, rows, meta, sums)
    if previous is not None:
        grad_c = previous.grad_c
    else:
        X = as_tensor(criterion.X, torch.float64, engine.device)
        y = torch.as_tensor(criterion.y, dtype=torch.long, device=engine.device)
        grad_c = engine.gradient_on(X, y)
    top = previous.lambda_max if previous else largest_curvature(engine, seed=settings.seed)
    solved = solve(engine, grad_c, settings.solver, max(settings.damping, at_least), top)
    staged = None
    if cache is not None:
        staged = {**key, "lambda_max": repr(top), "damping_used": repr(solved.damping)}
        cache.stage({"v": solved.x, "grad_c": grad_c}, staged)
    return CriterionDirection(solved.x, grad_c, top, solved.damping, False, {}, staged)


def scores(
    engine: InfluenceModel,
    direction: CriterionDirection,
    rows: np.ndarray | None = None,
    cache: Cache | None = None,
) -> np.ndarray:
    """psi_i = v . g_i (float64) for the given positions of the engine's rows (all: None),
    those no earlier request scored by one forward-mode pass (`per_row`).

    A float32 engine's pass also gives the removal guard's figures of the original model
    ("fit0": the float32 model it writes) on those rows, where they are not known yet: on
    the ResNet-18 of the scale benchmark, a forward pass over 4,454 rows (4.4 s of a 44 s
    cold removal) saved. A float64 engine's would be another model's figures."""

    def compute(at: np.ndarray) -> torch.Tensor:
        if at.size == engine.n:
            psi, figures = engine.scores_and_figures(direction.v)
        else:
            where = torch.as_tensor(at, device=engine.device)
            psi, figures = engine.scores_and_figures(direction.v, engine.X[where], engine.y[where])
        if engine.dtype == torch.float32:
            _learn(engine, direction, "fit0", at, figures.cpu().numpy())
        return psi

    return per_row(engine, direction, "psi", rows, compute, cache)


def _learn(
    engine: InfluenceModel,
    direction: CriterionDirection,
    name: str,
    at: np.ndarray,
    values: np.ndarray,
) -> None:
    """Keep `values` of `name` (PER_ROW) at the positions `at` where none is known yet;
    the caller's `per_row` stages them with its own."""
    known, unknown = _unknown(engine, direction, name, at)
    _keep(direction, name, known, at[unknown], values[unknown])


def _unknown(
    engine: InfluenceModel, direction: CriterionDirection, name: str, at: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The values of `name` known so far (NaN where none is, one row per engine row) and,
    for each position in `at`, whether its value is still to compute."""
    columns = PER_ROW[name]
    known = direction.rows.get(name)
    if known is None:
        known = np.full((engine.n,) if columns == 1 else (engine.n, columns), np.nan)
    missing = np.isnan(known[at])
    return known, missing if columns == 1 else missing.any(axis=1)


def _keep(
    direction: CriterionDirection,
    name: str,
    known: np.ndarray,
    positions: np.ndarray,
    values: np.ndarray,
) -> np.ndarray:
    """`known` with `values` at `positions`, as a new array kept in `direction.rows`."""
    known = known.copy()
    known[positions] = values
    direction.rows[name] = known
    return known


def per_row(
    engine: InfluenceModel,
    direction: CriterionDirection,
    name: str,
    rows: np.ndarray | None,
    compute: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    cache: Cache | None,
) -> np.ndarray:
    """The values `name` (PER_ROW) at the given positions of the engine's rows (all: None).

    Rows an earlier request computed come from `direction.rows`; `compute(positions)`
    gives the others, which join them, and when there is a cache all of it is staged
    again beside v (the job commits it), so that the next request finds them too."""
    wanted = np.arange(engine.n) if rows is None else np.asarray(rows, dtype=np.int64)
    known, unknown = _unknown(engine, direction, name, wanted)
    missing = wanted[unknown]
    if missing.size:
        fresh = compute(missing)
        values = fresh.cpu().numpy() if isinstance(fresh, torch.Tensor) else fresh
        known = _keep(direction, name, known, missing, values)
        _restage(direction, cache)
    return known[wanted]


def psi_weighted_sum(
    engine: InfluenceModel,
    direction: CriterionDirection,
    sign: float,
    rows: np.ndarray,
    psi: np.ndarray,
    cache: Cache | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """S = sum_j psi_j g_j over the rows j whose sign * psi_j > 0, and the positions it sums:
    an earlier request's (kept beside v, whatever rows it summed) or, when there is none,
    over `rows` (their scores `psi`) by one backward pass, staged for the next request.

    PUMA's upweighting is lambda_j = clip(t psi_j, 0, cap), so its gradient is t S less
    the rows where the two differ (`unlearn.puma`): a later request pays a backward pass
    over those few rows, not over every upweighted one."""
    name = "sum+" if sign > 0 else "sum-"
    mask = SUMS[name]
    if name in direction.sums and mask in direction.rows:
        return direction.sums[name], np.flatnonzero(direction.rows[mask] > 0.5)
    side = sign * psi > 0
    summed = rows[side]  # positions, sorted as `rows` is
    total = engine.gradient_at(summed, psi[side])
    inside = np.zeros(engine.n)
    inside[summed] = 1.0
    direction.sums[name], direction.rows[mask] = total, inside
    _restage(direction, cache)
    return total, summed


def _restage(direction: CriterionDirection, cache: Cache | None) -> None:
    """Stage v with every per-row value and sum known so far (the job commits it)."""
    if cache is None or direction.meta is None:
        return
    tensors = {"v": direction.v, "grad_c": direction.grad_c, **direction.sums}
    tensors.update({k: torch.from_numpy(x) for k, x in direction.rows.items()})
    cache.stage(tensors, direction.meta)


def _cache_key(
    checkpoint: Checkpoint, criterion: Dataset, settings: SolverSettings, engine: InfluenceModel
) -> dict[str, str]:
    if checkpoint.path is None:
        raise ValueError("a cached solve needs the checkpoint's path")
    return {
        "holds": "v, grad_c",  # a cache of v alone (before 0.1.0) is solved again
        "checkpoint_sha256": sha256_file(checkpoint.path),
        "criterion_sha256": criterion.sha256 or "",
        # which rows of that file: marked validation rows leave the criterion, and two
        # markings that drop as many, but not the same, must not share v
        "criterion_ids_sha256": _ids_digest(criterion),
        "criterion_rows": str(len(criterion)),
        "solver": settings.solver,
        "damping": repr(settings.damping),
        "precision": settings.precision,
        "curvature": engine.curvature,
        "curvature_samples": str(settings.curvature_samples) if engine.kronecker else "",
    }


def _ids_digest(data: Dataset) -> str:
    return hashlib.sha256("\n".join(map(str, data.ids)).encode()).hexdigest()


def _check_direction(size: int, rows: int) -> Check:
    """A cached v and grad C are finite float vectors of the model's size, with a positive
    eigenvalue and damping, and the per-row values (where there are any) float64 with one
    row per trained row, NaN where unknown but never inf: anything else would put garbage
    into a written model."""

    def vector(name: str, x: torch.Tensor | None, dtypes: tuple[torch.dtype, ...]) -> str | None:
        kind = "float64" if dtypes == (torch.float64,) else "float"
        if x is None or x.dtype not in dtypes or tuple(x.shape) != (size,):
            return f"does not hold {name} as a ({size},) {kind} vector"
        if not bool(torch.isfinite(x).all()):
            return f"holds NaN or inf in {name}"
        return None

    def check(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
        for name in ("v", "grad_c"):
            fault = vector(name, tensors.get(name), (torch.float32, torch.float64))
            if fault:
                return fault
        for name, columns in PER_ROW.items():
            x = tensors.get(name)
            if x is None:
                continue
            shape = (rows,) if columns == 1 else (rows, columns)
            if x.dtype != torch.float64 or tuple(x.shape) != shape:
                return f"does not hold {name} as a {shape} float64 array"
            if bool(torch.isinf(x).any()):
                return f"holds an infinite value in {name}"
        for name in SUMS:
            fault = vector(name, tensors[name], (torch.float64,)) if name in tensors else None
            if fault:
                return fault
        try:
            numbers = [float(meta["lambda_max"]), float(meta["damping_used"])]
        except (KeyError, ValueError):
            return "lacks its eigenvalue or damping"
        if not all(math.isfinite(x) and x > 0 for x in numbers):
            return "records a non-positive or non-finite eigenvalue or damping"
        return None

    return check
