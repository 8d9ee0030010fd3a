"""v = (H + mu I)^-1 grad C: solved once per model and criterion, cached beside the checkpoint.

Removal (Algorithm 1) and label debugging (Algorithm 2) both start from it. The cache,
`<stem>.influence.safetensors`, holds v and the damping that worked, keyed by the
checkpoint's and the criterion data's sha256 and the solver settings; a cache that does
not match or cannot be read is rebuilt, and one that cannot be written only costs time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puma_cli.data.dataset import Dataset
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.solvers import largest_eigenvalue, solve
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.io.atomic import sha256_file
from puma_cli.io.checkpoint import Checkpoint, single_model
from puma_cli.io.files import is_regular_file


@dataclass(frozen=True)
class SolverSettings:
    solver: str = "cg"
    damping: float = 0.01
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        require_range("--damping", self.damping, 0, low_open=True)
        require_range("--seed", self.seed, 0, SEED_MAX)


@dataclass
class CriterionDirection:
    """v (P,) float64, H's largest eigenvalue, the damping share used, whether it was cached."""

    v: torch.Tensor
    grad_c: torch.Tensor
    lambda_max: float
    damping: float
    cached: bool


def cache_path_for(checkpoint: Path) -> Path:
    """m.safetensors -> m.influence.safetensors."""
    return checkpoint.with_name(f"{checkpoint.stem}.influence.safetensors")


def derivative_dtype(checkpoint: Checkpoint, precision: str) -> torch.dtype:
    """float64 unless asked otherwise; `auto` takes float32 for convolutional nets, whose
    float64 convolutions are several times slower on a CPU."""
    if precision == "auto":
        precision = "float32" if checkpoint.arch.name == "cnn" else "float64"
    if precision not in ("float32", "float64"):
        raise PumaError(f"--precision {precision!r}: choose auto, float32 or float64")
    return torch.float32 if precision == "float32" else torch.float64


def training_engine(
    checkpoint: Checkpoint, dataset: Dataset, rows: np.ndarray, precision: str
) -> InfluenceModel:
    """The engine over the given rows of the training file, with the recipe's weight decay."""
    data = dataset.subset(rows)
    return InfluenceModel(
        single_model(checkpoint, "the influence engine (puma, influence, debug-labels, calibrate)"),
        data.X,
        data.y,
        float(checkpoint.recipe.get("weight_decay", 0.0)),
        dtype=derivative_dtype(checkpoint, precision),
    )


def criterion_direction(
    engine: InfluenceModel,
    checkpoint: Checkpoint,
    criterion: Dataset,
    settings: SolverSettings,
    cache: Path | None,
) -> CriterionDirection:
    """grad C on the criterion data and v = H^-1 grad C, from the cache when it fits."""
    X = torch.as_tensor(criterion.X, dtype=torch.float64, device=engine.device)
    y = torch.as_tensor(criterion.y, dtype=torch.long, device=engine.device)
    grad_c = engine.gradient_on(X, y)
    key = _cache_key(checkpoint, criterion, settings) if cache is not None else {}
    if cache is not None:
        hit = _read_cache(cache, key, engine.n_parameters)
        if hit is not None:
            v, top, damping = hit
            return CriterionDirection(v.to(engine.device), grad_c, top, damping, True)
    top = largest_eigenvalue(engine.hvp, engine.n_parameters, engine.theta, seed=settings.seed)
    solved = solve(engine, grad_c, settings.solver, settings.damping, top)
    if cache is not None:
        _write_cache(
            cache, solved.x, {**key, "lambda_max": repr(top), "damping_used": repr(solved.damping)}
        )
    return CriterionDirection(solved.x, grad_c, top, solved.damping, False)


def _cache_key(
    checkpoint: Checkpoint, criterion: Dataset, settings: SolverSettings
) -> dict[str, str]:
    if checkpoint.path is None:
        raise ValueError("a cached solve needs the checkpoint's path")
    return {
        "checkpoint_sha256": sha256_file(checkpoint.path),
        "criterion_sha256": criterion.sha256 or "",
        "criterion_rows": str(len(criterion)),
        "solver": settings.solver,
        "damping": repr(settings.damping),
        "precision": settings.precision,
    }


def _read_cache(
    cache: Path, key: dict[str, str], size: int
) -> tuple[torch.Tensor, float, float] | None:
    if not is_regular_file(cache):
        return None
    try:
        tensors = load_file(str(cache))
        with open(cache, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        meta = header.get("__metadata__", {})
        if all(meta.get(k) == v for k, v in key.items()) and tensors["v"].numel() == size:
            return tensors["v"], float(meta["lambda_max"]), float(meta["damping_used"])
    except (SafetensorError, OSError, ValueError, KeyError):
        pass  # a stale or damaged cache is rebuilt
    return None


def _write_cache(cache: Path, v: torch.Tensor, meta: dict[str, str]) -> None:
    tmp = cache.with_name(f".{cache.name}.tmp")
    try:
        save_file({"v": v.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        tmp.replace(cache)
    except OSError:
        tmp.unlink(missing_ok=True)
