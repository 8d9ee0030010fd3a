"""Removal methods behind one signature: `method(request) -> RemovalResult`, and a registry.

A request holds the model and its whole record: the training file, which of its rows
the model was trained on, the marked rows to remove (all trained on), and the held-out
criterion data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.engine.training_engine import SolverSettings
from puma_cli.errors import SEED_MAX, PumaError, require_range
from puma_cli.io.cache import Cache
from puma_cli.io.checkpoint import ROLE_TRAINED, Checkpoint
from puma_cli.models.architectures import Model

FORGETTING = ("step", "match", "repair", "none")  # RemovalOptions.forget
# PUMA scores and reweights this many random remaining rows by default: past it, all of
# them cost passes over the data and changed nothing measurable (benchmarks/scale.py).
UPWEIGHT_SAMPLE = 8192


@dataclass(frozen=True)
class RemovalOptions:
    """eta: 'auto' or a multiple of 1/N (1 = first-order exact removal of the marked points).

    damping: mu as a share of the Hessian's largest eigenvalue (raised when needed).
    upweight_sample: reweight only this many random remaining points (0: all of them);
        the marked rows and these are the only ones PUMA scores and differentiates.
    lambda_cap: largest weight one remaining point may get (1 = counted twice).
    max_accuracy_drop: the `auto` guard, in accuracy points on the criterion data.
    fit_tolerance: the `auto` guard on the remaining points' training loss and the
        held-out loss, as a relative rise.
    precision: the dtype of derivatives: float64, float32, or auto (float32 for a CNN).
    ssd_alpha, ssd_lambda: SSD's selection threshold and dampening constant.
    epochs, lr: the fine-tuning baselines' schedule (None: a tenth of the recipe's epochs,
        at its learning rate).
    neggrad_alpha: NegGrad+'s weight on the remaining rows' loss (1 - it on the marked).
    mask_share: SalUn's share of the weights its saliency mask lets move.
    forget: how PUMA makes up for what first-order removal leaves (`step_length`): step
        (the default: the step size guarded by accuracy, not by the remaining rows' loss),
        match (step, stopped where the marked rows' loss reaches the held-out loss), repair
        (the patch, then a short fine-tune on the remaining rows) or none (the paper's
        Algorithm 1 with the loss-guarded step).
    """

    eta: float | str = "auto"
    damping: float = 0.01
    solver: str = "cg"
    upweight_sample: int = UPWEIGHT_SAMPLE
    lambda_cap: float = 1.0
    max_accuracy_drop: float = 1.0
    fit_tolerance: float = 0.1
    precision: str = "auto"
    ssd_alpha: float = 10.0
    ssd_lambda: float = 1.0
    epochs: int | None = None
    lr: float | None = None
    neggrad_alpha: float = 0.999
    mask_share: float = 0.5
    forget: str = "step"  # puma, influence: step, match, repair or none (Algorithm 1's guard)
    seed: int = 0
    curvature: str = "auto"
    curvature_samples: int = 0
    cache: Cache | None = None  # staged by the engine, committed by the job
    factor_cache: Cache | None = None  # K-FAC/EK-FAC factors, likewise

    def validate(self) -> None:
        """Refuse, before any work, a value no removal could use."""
        if self.eta != "auto":
            require_range("--eta", float(self.eta), 0, low_open=True)
        require_range("--damping", self.damping, 0, low_open=True)
        require_range("--upweight-sample", self.upweight_sample, 0)
        require_range("--lambda-cap", self.lambda_cap, 0, low_open=True)
        require_range("--max-accuracy-drop", self.max_accuracy_drop, 0, 100)
        require_range("--alpha", self.ssd_alpha, 0, low_open=True)
        require_range("--lambda", self.ssd_lambda, 0, low_open=True)
        if self.epochs is not None:
            require_range("--epochs", self.epochs, 1, 100_000)
        if self.lr is not None:
            require_range("--lr", self.lr, 0, low_open=True)
        require_range("--alpha", self.neggrad_alpha, 0, 1)
        require_range("--mask-share", self.mask_share, 0, 1, low_open=True)
        if self.forget not in FORGETTING:
            raise PumaError(f"--forget {self.forget!r}: choose {', '.join(FORGETTING)}")
        self.solver_settings().validate()
        require_range("--seed", self.seed, 0, SEED_MAX)

    def recordable(self) -> dict[str, Any]:
        """The options as plain values (the caches left out), for the provenance."""
        return {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("cache", "factor_cache")
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RemovalOptions:
        """Options back from `recordable` (unknown keys ignored, missing ones default)."""
        known = set(cls.__dataclass_fields__) - {"cache", "factor_cache"}
        return cls(**{k: v for k, v in record.items() if k in known})

    def solver_settings(self) -> SolverSettings:
        return SolverSettings(
            self.solver,
            self.damping,
            self.precision,
            self.seed,
            self.curvature,
            self.curvature_samples,
        )


@dataclass
class RemovalRequest:
    checkpoint: Checkpoint
    dataset: Dataset
    marked: np.ndarray
    criterion: Dataset
    options: RemovalOptions = field(default_factory=RemovalOptions)
    device: torch.device | str = "cpu"
    progress: Callable[[int, int, float], None] | None = None  # epochs, for retraining
    phases: Callable[[str, int, int], None] | None = None  # the engine's passes and solves

    @property
    def trained_rows(self) -> np.ndarray:
        """Positions in `dataset` of the rows the model is trained on now (marked included)."""
        return np.flatnonzero(self.checkpoint.roles == ROLE_TRAINED)

    @property
    def remaining_rows(self) -> np.ndarray:
        return np.setdiff1d(self.trained_rows, self.marked)


@dataclass
class RemovalResult:
    """The new model and what the method knows about how it got there."""

    model: Model
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] | None = None  # replaces the checkpoint's extra tensors
    eta: float | None = None
    predicted_criterion_change: float | None = None
    warnings: list[str] = field(default_factory=list)
    cached: bool = False


Method = Callable[[RemovalRequest], RemovalResult]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def add(method: Method) -> Method:
        METHODS[name] = method
        return method

    return add


def applicable(name: str, checkpoint: Checkpoint) -> str | None:
    """Why `--method name` cannot apply to the checkpoint (the fix included), or None: what
    `compare` checks before running anything. Each method refuses the same cases itself."""
    from puma_cli.models.architectures import Classifier

    ensemble = not isinstance(checkpoint.model, Classifier)
    if name == "retrain":
        return None
    if name == "sisa":
        if ensemble and "sisa.shard" in checkpoint.extra:
            return None
        return "sisa needs a SISA ensemble (`puma train --shards 5`)"
    if ensemble:
        return f"{name} needs a single model, and this is a SISA ensemble: use sisa or retrain"
    if name == "amnesiac" and "updates" not in checkpoint.sidecars:
        return "amnesiac needs the updates recorded at training (`puma train --record-updates`)"
    return None


def get_method(name: str) -> Method:
    # Importing the modules fills the registry.
    from puma_cli.unlearn import amnesiac, finetuning, puma, retrain, sisa, ssd  # noqa: F401

    if name not in METHODS:
        raise PumaError(f"--method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
