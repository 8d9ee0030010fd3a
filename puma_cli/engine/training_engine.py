"""The influence engine over a checkpoint's training rows: its network, the rows, the
dtype its derivatives are taken in, and the curvature `SolverSettings` names (K-FAC and
EK-FAC factors read from or staged in their cache beside the model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from puma_cli import parallel
from puma_cli.data.dataset import Dataset
from puma_cli.devices import device_memory
from puma_cli.engine.curvature import (
    CURVATURES,
    MAX_SAMPLES,
    attach_curvature,
    factor_cost_note,
    multiply_adds,
    resolve_curvature,
    weigh_factors,
)
from puma_cli.engine.derivatives import InfluenceModel, Phases
from puma_cli.engine.factor_layers import factor_shapes
from puma_cli.engine.kronecker import KINDS
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.io.atomic import sha256_file
from puma_cli.io.cache import Cache
from puma_cli.io.checkpoint import Checkpoint, single_model
from puma_cli.models.recipe import loss_weight_decay


@dataclass(frozen=True)
class SolverSettings:
    solver: str = "cg"
    damping: float = 0.01
    precision: str = "auto"
    seed: int = 0
    curvature: str = "auto"
    curvature_samples: int = 0  # 0: the default subsample for kfac/ekfac

    def validate(self) -> None:
        require_range("--damping", self.damping, 0, low_open=True)
        require_range("--seed", self.seed, 0, SEED_MAX)
        if self.curvature not in CURVATURES:
            raise PumaError(f"--curvature {self.curvature!r}: choose {', '.join(CURVATURES)}")
        require_range("--curvature-samples", self.curvature_samples, 0, MAX_SAMPLES)


FLOAT64_MAX_PARAMETERS = 100_000


CONV_CHUNK = 128  # rows per pass for convolutional nets: 2,048 ran 3.6x slower on a CPU


def is_convolutional(checkpoint: Checkpoint) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in checkpoint.model.modules())


def derivative_dtype(checkpoint: Checkpoint, precision: str) -> torch.dtype:
    """float64 unless asked otherwise; `auto` takes float32 for any net with a convolution
    (cnn, resnet18, densenet, a user's), whose float64 convolutions are several times
    slower on a CPU, and for any net past FLOAT64_MAX_PARAMETERS, where float64 matrix
    products cost twice what the model was trained with (the solvers' sums stay float64)."""
    if precision == "auto":
        convolutional = is_convolutional(checkpoint)
        size = sum(p.numel() for p in checkpoint.model.parameters())
        precision = "float32" if convolutional or size > FLOAT64_MAX_PARAMETERS else "float64"
    if precision not in ("float32", "float64"):
        raise PumaError(f"--precision {precision!r}: choose auto, float32 or float64")
    return torch.float32 if precision == "float32" else torch.float64


def training_engine(
    checkpoint: Checkpoint,
    dataset: Dataset,
    rows: np.ndarray,
    precision: str,
    *,
    settings: SolverSettings | None = None,
    factor_cache: Cache | None = None,
    phases: Phases | None = None,
) -> InfluenceModel:
    """The engine over the given rows of the training file, with the recipe's weight decay,
    and the curvature `settings` names (K-FAC factors read from or staged in the cache)."""
    engine = _engine(checkpoint, dataset, rows, precision)
    engine.phases = phases
    if settings is not None:
        auto = settings.curvature == "auto"  # what it weighs: one small forward pass each
        work_per_row = multiply_adds(engine.module, engine.X[:1]) if auto else None
        kronecker = auto or settings.curvature in KINDS
        epochs = int(checkpoint.recipe.get("epochs") or 0)
        shapes = factor_shapes(engine.module, engine.X[:2]) if kronecker else []
        choice = resolve_curvature(
            settings.curvature,
            engine.n_parameters,
            engine.n,
            checkpoint.arch.n_classes,
            settings.curvature_samples,
            convolutional=is_convolutional(checkpoint),
            work_per_row=work_per_row or 0,
            kronecker_fits=not auto or bool(shapes),
            epochs=epochs,
        )
        if work_per_row is None and choice.name in KINDS:
            work_per_row = multiply_adds(engine.module, engine.X[:1])
        choice = weigh_factors(
            choice,
            shapes,
            auto=auto,
            rows=engine.n,
            work_per_row=work_per_row or 0,
            n_parameters=engine.n_parameters,
            element_size=8 if precision == "float64" else 4,
            memory=_least_memory(engine.device) if choice.name in KINDS else None,
        )
        key = {"precision": str(engine.dtype)}
        path = checkpoint.path
        if path is None:
            factor_cache = None  # a cache is keyed by the checkpoint's file
        elif factor_cache is not None and choice.name in KINDS:  # hash only where it is read
            key["checkpoint_sha256"] = sha256_file(path)
        fit_dtype = torch.float64 if precision == "float64" else torch.float32
        attach_curvature(engine, choice, key, settings.seed, factor_cache, fit_dtype)
        engine.cost_note = factor_cost_note(engine, choice.samples, epochs, work_per_row)
    return engine


def _least_memory(device: torch.device) -> int | None:
    """The memory each process may use (`device_memory`), the least over torchrun's
    processes, so that every process weighs the factors alike."""
    memory = device_memory(device)
    if not parallel.active():
        return memory
    known = torch.tensor([-1 if memory is None else memory], dtype=torch.float64)
    every = parallel.gather(known)
    return None if bool((every < 0).any()) else int(every.min())


def _engine(
    checkpoint: Checkpoint, dataset: Dataset, rows: np.ndarray, precision: str
) -> InfluenceModel:
    data = dataset.subset(rows)
    model = single_model(
        checkpoint, "the influence engine (puma, influence, debug-labels, calibrate)"
    )

    def engine(dtype: torch.dtype) -> InfluenceModel:
        return InfluenceModel(
            model,
            data.X,
            data.y,
            loss_weight_decay(checkpoint.recipe),
            chunk_size=CONV_CHUNK if is_convolutional(checkpoint) else 2048,
            dtype=dtype,
            label_smoothing=float(checkpoint.recipe.get("label_smoothing", 0.0)),
            class_weights=tuple(checkpoint.recipe.get("class_weights") or ()),
        )

    dtype = derivative_dtype(checkpoint, precision)
    chosen = engine(dtype)
    failure = _float64_failure(chosen) if precision == "auto" else None
    if failure is not None:
        # The net was trained in float32, where it runs; one that makes its own tensors
        # in forward (torch.eye(d), torch.ones(n, 1)) gets float32 ones beside float64.
        chosen = engine(torch.float32)
        chosen.precision_note = (
            f"the network fails in float64 ({failure}), where puma takes a small model's "
            "derivatives: they were taken in float32, as for a large one; to have float64, "
            "make the tensors its forward creates with the input's dtype (dtype=x.dtype)"
        )
    return chosen


def _float64_failure(engine: InfluenceModel) -> str | None:
    """Why a float64 engine's network cannot run in float64 (it raises on two rows, or
    returns logits of another dtype), or None: where it can, or the engine is float32."""
    if engine.dtype != torch.float64:
        return None
    try:
        with torch.no_grad():
            logits = engine.logits(engine.theta, engine.X[:2])
    except Exception as exc:  # the user's code, in a dtype it was not written for
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")
    if logits.dtype != torch.float64:
        return f"its logits come out {str(logits.dtype).removeprefix('torch.')}"
    return None
