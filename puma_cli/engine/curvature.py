"""Which curvature an engine inverts: `--curvature exact|ggn|kfac|ekfac|auto`.

- exact: the Hessian of J, by double backward; CG, LiSSA or a dense solve (the paper's).
- ggn: the Gauss-Newton matrix J^T H_logits J, positive semi-definite, by one forward-mode
  and one backward pass per product; CG, LiSSA or dense like exact.
- kfac, ekfac: Kronecker factors of the GGN fitted once on a subsample of the training
  rows (`--curvature-samples`) and cached beside the model; a solve is closed-form
  (`engine.kronecker`), so a removal costs the passes for its gradients and scores only.
- auto: kfac where the exact Hessian costs seconds per product, past AUTO_EXACT_MAX
  parameter-rows (parameters x rows; a row's multiply-adds where they are more, as a
  convolution's weights are used at every position); exact below that (the paper's
  models on its data: a removal there takes under a second, and the paper used the exact
  Hessian).
  Measured (benchmarks/results/scale.md): on every CPU case past the threshold, K-FAC
  removed faster (0.3-0.4x retraining cold against 0.7-2.6x for exact CG) and nearer
  to retraining on the marked rows' loss. Past it, `auto` still takes the GGN where the
  factors, weighed before fitting (`weigh_factors`), would cost more than its solves or
  half the memory: a very wide input layer, whose input factor is d x d.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.factor_fitting import APPROXIMATION, fit_kronecker, kronecker_from_tensors
from puma_cli.engine.factor_layers import EXPAND_BELOW, PROBE_ROWS, FactorShape, through_rows
from puma_cli.engine.kronecker import (
    KINDS,
    LOW_RANK_MIN,
    OVERSAMPLE,
    KroneckerCurvature,
    keeps_range,
)
from puma_cli.errors import PumaError, require_range
from puma_cli.io.cache import Cache

CURVATURES = ("auto", "exact", "ggn", "kfac", "ekfac")
AUTO_EXACT_MAX = 10_000_000  # parameters (or a row's multiply-adds, if more) x rows
DEFAULT_SAMPLES = 10_000
DEFAULT_CONV_SAMPLES = 2_000  # a convolution's input factor costs more than its training
MAX_SAMPLES = 10_000_000
# The exact (type-2) Fisher costs one backward pass per class and batch, the sampled one
# (MC, one label a row) one. Measured against CG on the exact GGN (cosine of the marked
# rows' solve, damping 0.01) on the benchmark MLPs: 0.943 against MC's 0.927 (64k
# parameters, 9k rows), 0.874 against 0.867 (64k, 36k), 0.880 against 0.879 (2k, 36k),
# for fits of 0.41 / 0.52 / 0.14 s against 0.12 / 0.15 / 0.05 s: K-FAC's own distance
# from the GGN is ten times what MC adds, and on those nets the fit was most of a cold
# removal. So type-2 only where it costs little (up to 2,000 rows at 10 classes).
TYPE2_MAX_WORK = 20_000  # rows x classes: above it, one sampled label per row (MC)
TYPE2_MAX_PARAMETERS = 100_000  # type-2 costs one backward pass per class: small nets only
# ... and its rows x classes at most this share of training's passes (3 a row and epoch):
# a net trained briefly spends on them what it took to train. Measured on 2,250 16x16
# images, 10 classes, 2,000 fitting rows: a GroupNorm ResNet of 3 epochs removed cold in
# 8.3 s (type-2) against 3.9 s (MC), its training 5.6 s, the marked loss 0.4846 against
# 0.4873; a small ViT of 8 epochs 3.9 s against 2.2 s. The digits CNN (20 epochs) spends
# 0.17 of its passes on them and keeps type-2.
TYPE2_TRAINING_SHARE = 0.25
FIT_BATCH = 512  # most rows per batch when fitting (a convolution's: its engine chunk, 128)
# Fitting the factors at twice training's multiply-adds or more draws a note: a 10,000-wide
# input layer on 3,600 rows counts 6x (23 s against an 11 s retrain; 16x and 72 s when
# its factor was summed whole); the benchmark's 2k, 64k and 1 M MLPs 0.075x, 0.063x and
# 0.017x, the digits CNN 0.009x (20 epochs, factors fitted on every row or 10,000).
FACTOR_COST_NOTED = 2
# `auto` takes the GGN where K-FAC's factors would cost more multiply-adds than this many
# passes of the model over the rows. Measured on wide input layers (2 cores, float32):
# the factors' large products ran at 17-23 G multiply-adds a second, the GGN's
# conjugate gradients (50-100 products, 3-4 passes each) at about 4 G. 30,000 features,
# 16 hidden, 1,349 rows: the factor summed whole, 5,800 passes' work, K-FAC 200 s (an
# 18.5 GB peak) against the GGN's 27 s (1.3 GB) and training's 9 s; from its rows
# (`through_rows`), 255 passes, K-FAC 9.0 s (1.8 GB). 10,000 features, 64 hidden, 3,600
# rows: summed, 480 passes and 72 s; from the rows 190 and 23 s; the GGN 54 s.
AUTO_FACTOR_PASSES = 400
FIT_BATCHES = 16  # fewest batches (down to 128 rows each), so that torchrun can split them


@dataclass(frozen=True)
class CurvatureChoice:
    """The resolved curvature, the rows its factors are fitted on, and the Fisher type."""

    name: str
    samples: int
    fisher: str
    note: str = ""  # why `auto` chose as it did, where the report should say


def resolve_curvature(
    name: str,
    n_parameters: int,
    n_rows: int,
    n_classes: int,
    samples: int,
    convolutional: bool = False,
    work_per_row: int = 0,
    kronecker_fits: bool = True,
    epochs: int = 0,
) -> CurvatureChoice:
    """`auto` made concrete, and the subsample size (0: the default) bounded by the rows.
    `work_per_row`: a row's multiply-adds (`multiply_adds`); `auto` weighs the rows by it
    where it is more than the parameters. A 330-parameter convolution on 8x8 digits does
    9,400 a row: its exact Hessian-vector products cost what a net of that size would.
    `kronecker_fits`: the model has a Linear or Conv2d layer K-FAC can fit (else `auto`
    takes the GGN past the exact Hessian's share, and says why in `note`). `epochs`: the
    recipe's (0 where unknown), against which the exact Fisher's passes are weighed."""
    if name not in CURVATURES:
        raise PumaError(f"--curvature {name!r}: choose {', '.join(CURVATURES)}")
    require_range("--curvature-samples", samples, 0, MAX_SAMPLES)
    note = ""
    if name == "auto":
        cost = max(n_parameters, work_per_row) * n_rows
        name = "exact" if cost <= AUTO_EXACT_MAX else "kfac"
        if name == "kfac" and not kronecker_fits:
            name = "ggn"
            note = (
                "--curvature auto: the model has no Linear or Conv2d layer K-FAC can fit "
                "(weights used through functional calls, frozen, tied or parametrized, or "
                "layers scripted by torch.jit.script), so "
                "the solves use the Gauss-Newton matrix by conjugate gradients, tens of passes "
                "over the rows each"
            )
    default = DEFAULT_CONV_SAMPLES if convolutional else DEFAULT_SAMPLES
    count = min(samples or default, n_rows)
    exact_fisher = count * n_classes <= TYPE2_MAX_WORK and n_parameters <= TYPE2_MAX_PARAMETERS
    if epochs > 0:
        exact_fisher &= count * n_classes <= TYPE2_TRAINING_SHARE * 3 * epochs * n_rows
    fisher = "type-2" if exact_fisher else "mc"
    return CurvatureChoice(name, count, fisher, note)


def multiply_adds(module: nn.Module, probe: torch.Tensor) -> int:
    """Multiply-adds of the module's Linear and convolution layers on `probe` (one row):
    each weight once per position it is applied at (output elements / output channels x
    weight size). Counted by forward hooks; other layers' work is not counted."""
    total = 0

    def count(layer: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        weight = layer.weight
        if isinstance(output, torch.Tensor) and isinstance(weight, torch.Tensor):
            total += output.numel() // weight.shape[0] * weight.numel()

    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module(probe.clone())  # a copy: a forward may write into its input
    finally:
        for hook in hooks:
            hook.remove()
    return total


def attach_curvature(
    engine: InfluenceModel,
    choice: CurvatureChoice,
    key: dict[str, str],
    seed: int,
    cache: Cache | None,
    fit_dtype: torch.dtype = torch.float32,
) -> None:
    """Set the engine's curvature; for kfac/ekfac, its factors from the cache when they fit
    (checked: shapes, finite, non-negative), else fitted on a seeded subsample and staged.

    The factors are fitted in `fit_dtype` (float32 unless float64 is asked for: they are
    an approximation, and a float64 engine's passes cost twice as much; measured on a 64k
    MLP over 9,000 rows, a cold removal fell from 1.46 s to 1.05 s with the same patch to
    three digits), decomposed in it too, and cached in it."""
    engine.curvature = choice.name
    engine.curvature_note = choice.note
    if choice.name not in KINDS:
        return
    size = _fit_batch(engine, choice)
    full_key = {**key, "curvature": choice.name, "samples": str(choice.samples),
                "fisher": choice.fisher, "seed": str(seed), "rows": str(engine.n),
                "labels": "seeded per batch", "batch": str(size),
                "fit_precision": str(fit_dtype), "decomposed_in": str(fit_dtype),
                "shared_weights": f"{APPROXIMATION}; expand where it holds under "
                f"{EXPAND_BELOW} of a layer's trace on {PROBE_ROWS} rows",
                "input_factors": f"their range alone past {LOW_RANK_MIN} wide; a wide "
                "Linear layer's from its rows"
                + ("; EK-FAC's basis too, at one position a row" if choice.name == "ekfac" else ""),
                "self_attention": "as modules"}  # fmt: skip
    if cache is not None:
        found: list[KroneckerCurvature] = []

        def check(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
            tensors = {k: v.to(engine.device) for k, v in tensors.items()}
            curvature = kronecker_from_tensors(
                choice.name, engine.module, engine.names, engine.sizes, tensors, engine.X[:2]
            )
            if curvature is None:
                return "does not hold factors for this model's layers"
            found.append(curvature)
            return None

        if cache.load(full_key, check) is not None:
            engine.kronecker = found[0]
            engine.kronecker_cached = True
            return
    phase = f"fitting {choice.name} factors"
    engine.tell(phase, 0, 1)
    rows = np.sort(np.random.default_rng(seed).permutation(engine.n)[: choice.samples])
    index = torch.as_tensor(rows, device=engine.device)
    X, y = engine.X[index].to(fit_dtype), engine.y[index]
    batches = [(X[i : i + size], y[i : i + size]) for i in range(0, len(rows), size)]
    module = engine.module
    if fit_dtype != engine.dtype:
        module = copy.deepcopy(module).to(fit_dtype)
    with torch.enable_grad():
        engine.kronecker = fit_kronecker(
            choice.name, module, engine.names, engine.sizes, batches, choice.fisher, seed,
            lambda done, total: engine.tell(phase, done, total), engine.class_weight,
        )  # fmt: skip
    engine.kronecker_cached = False
    if cache is not None:
        cache.stage(engine.kronecker.to_tensors(fit_dtype), full_key)


def factor_cost_ratio(
    engine: InfluenceModel, samples: int, epochs: int, work_per_row: int | None = None
) -> float:
    """Multiply-adds of fitting and decomposing the engine's K-FAC factors over those of
    training the model (0 where no factors were fitted). Training: 3 passes a row and
    epoch of the Linear and convolution layers' work, at least one multiply-add per
    parameter; the factors: samples x d^2 each and the decomposition's d^3, or 2 d^2 k
    where only a range of width k is kept. Both are rough, for telling cases apart that
    differ by far: a very wide input layer, whose factor is d x d. `work_per_row`: the
    row's multiply-adds where already counted (`multiply_adds`), else counted here."""
    kron = engine.kronecker
    if kron is None or engine.kronecker_cached or not kron.blocks:
        return 0.0
    factors = [(int(b.Qb.shape[0]), int(b.Qb.shape[1])) for b in kron.blocks]
    rows = [int(b.Qa.shape[0]) for b in kron.blocks if b.module in kron.from_rows]
    factors += [
        (int(b.Qa.shape[0]), int(b.Qa.shape[1]))
        for b in kron.blocks
        if b.module not in kron.from_rows
    ]
    if work_per_row is None:
        work_per_row = multiply_adds(engine.module, engine.X[:1])
    work = _factor_work(factors, samples) + _rows_work(rows, samples)
    return work / _training_work(epochs, engine.n, work_per_row, engine.n_parameters)


def _factor_work(factors: list[tuple[int, int]], samples: int) -> int:
    """Multiply-adds of fitting (d, k) factors on `samples` rows and decomposing them:
    samples x d^2 each, and d^3 for eigh, or 2 d^2 k where the range alone is kept."""
    return sum(samples * d * d + (2 * d * d * k if k < d else d**3) for d, k in factors)


def _rows_work(widths: list[int], samples: int) -> int:
    """Multiply-adds of input factors taken from their rows (`decompose_rows`): a QR of
    the (d, samples) rows, their samples^2 Gram and its eigh, the basis taken back."""
    return sum(3 * d * samples * samples + samples**3 for d in widths)


def _training_work(epochs: int, rows: int, work_per_row: int, n_parameters: int) -> int:
    """Multiply-adds of training: 3 passes a row and epoch, at least one per parameter."""
    return 3 * max(epochs, 1) * rows * max(work_per_row, n_parameters)


def predicted_factor_work(shapes: list[FactorShape], samples: int, kind: str) -> int:
    """`_factor_work` before fitting, from the layers' widths: an input factor past
    LOW_RANK_MIN and more than twice samples + OVERSAMPLE wide keeps its range alone, as
    `decompose` does, and a Linear layer's is then taken from its rows (`through_rows`:
    under EK-FAC, where it sees one position a row); an output factor is decomposed
    whole."""

    def kept(d: int) -> int:
        return samples + OVERSAMPLE if keeps_range(d, samples) else d

    def by_rows(s: FactorShape) -> bool:
        return through_rows(s.linear, s.inputs, samples, kind, s.positions)

    factors = [(s.inputs, kept(s.inputs)) for s in shapes if not by_rows(s)]
    rows = [s.inputs for s in shapes if by_rows(s)]
    factors += [(s.outputs, s.outputs) for s in shapes]
    return _factor_work(factors, samples) + _rows_work(rows, samples)


def fit_bytes(shapes: list[FactorShape], element_size: int, samples: int, kind: str) -> int:
    """Memory a fit holds at its peak, roughly: every factor's float64 total and its copy
    in the fit's dtype, and for the widest one a batch's share and the decomposition's
    work; an input factor taken from its rows (`through_rows`), three copies of them
    (as fitted, joined, and the QR's basis). Measured: one 30,001-wide input factor
    summed whole (3.6 GB in float32), 17.3 GB above the process's 1.2 GB before
    fitting; this gives 18.0 GB."""
    rows = 0
    squares = [s.outputs**2 for s in shapes]
    for s in shapes:
        if through_rows(s.linear, s.inputs, samples, kind, s.positions):
            rows += 3 * s.inputs * samples * element_size
        else:
            squares.append(s.inputs**2)
    whole = sum(squares) * (8 + element_size) + max(squares, default=0) * 2 * element_size
    return whole + rows


def _amount(size: int) -> str:
    """Bytes as a person reads them: GB from a tenth of one, else MB."""
    return f"{size / 1e9:.1f} GB" if size >= 10**8 else f"{size / 1e6:.0f} MB"


def weigh_factors(
    choice: CurvatureChoice,
    shapes: list[FactorShape],
    *,
    auto: bool,
    rows: int,
    work_per_row: int,
    n_parameters: int,
    element_size: int,
    memory: int | None,
) -> CurvatureChoice:
    """K-FAC or EK-FAC weighed before fitting. `auto` takes the GGN where the factors
    would cost more multiply-adds than AUTO_FACTOR_PASSES passes of the model over the
    rows, or would fill half the memory (`memory`: bytes this process may use, None
    where unknown); asked for by name, a fit that would need more than all of the memory
    is refused."""
    if choice.name not in KINDS or not shapes:
        return choice
    need = fit_bytes(shapes, element_size, choice.samples, choice.name)
    widest = max(shapes, key=lambda s: max(s.inputs, s.outputs))
    width = max(widest.inputs, widest.outputs)
    side = "input" if widest.inputs >= widest.outputs else "output"
    gigabytes = _amount(need)
    if auto:
        work = predicted_factor_work(shapes, choice.samples, choice.name)
        passes = work / (rows * max(work_per_row, n_parameters, 1))
        if passes <= AUTO_FACTOR_PASSES and (memory is None or need <= memory / 2):
            return choice
        return CurvatureChoice(
            "ggn",
            choice.samples,
            choice.fisher,
            f"--curvature auto: fitting K-FAC's factors would take the multiply-adds of "
            f"about {passes:,.0f} passes of the model over its {rows:,} rows and about "
            f"{gigabytes} of memory (layer {widest.layer!r} has an {side} factor {width:,} "
            "wide), more than conjugate gradients on the Gauss-Newton matrix would take, "
            "so the solves use those; --curvature kfac fits the factors anyway, on fewer "
            'rows with --curvature-samples (README: "Removal at scale")',
        )
    if memory is not None and need > memory:
        raise PumaError(
            f"--curvature {choice.name} would need about {gigabytes} of memory to fit its "
            f"factors (layer {widest.layer!r} has an {side} factor {width:,} wide), more "
            f"than the {_amount(memory)} here; use "
            "--curvature ggn or exact (conjugate gradients, no factor), or a network that "
            "narrows its input first"
        )
    return choice


def factor_cost_note(
    engine: InfluenceModel, samples: int, epochs: int, work_per_row: int | None = None
) -> str:
    """A warning where the factors cost FACTOR_COST_NOTED times training or more, naming
    the layer with the widest input factor; else ""."""
    ratio = factor_cost_ratio(engine, samples, epochs, work_per_row)
    if ratio < FACTOR_COST_NOTED or engine.kronecker is None:
        return ""
    widest = max(engine.kronecker.blocks, key=lambda b: b.Qa.shape[0])
    of = "its inputs and bias" if widest.bias is not None else "its inputs"
    return (
        f"fitting the {engine.curvature} factors took about {ratio:.0f}x the multiply-adds "
        f"of training this model ({epochs} epochs on {engine.n:,} rows): layer "
        f"{widest.module!r} has an input factor {widest.Qa.shape[0]:,} wide ({of}), fitted "
        f"on {samples:,} rows; fewer rows (--curvature-samples) cost less, and --method "
        'retrain may be quicker (README: "Removal at scale")'
    )


def _fit_batch(engine: InfluenceModel, choice: CurvatureChoice) -> int:
    """Rows per fitting batch: FIT_BATCH at most, the engine's chunk for convolutions, and
    small enough for FIT_BATCHES batches (down to 128 rows). It depends on the rows alone,
    never on the processes, so that the sampled labels (seeded per batch) are the same under
    torchrun. 512-row batches against 128 took a cold removal on a 2k MLP from 0.72 s to
    0.34 s: type-2 costs one backward call per class and batch."""
    return min(FIT_BATCH, engine.chunk_size, max(128, -(-choice.samples // FIT_BATCHES)))


def describe(engine: InfluenceModel) -> dict[str, object]:
    """What a report says about the curvature used."""
    info: dict[str, object] = {
        "curvature": engine.curvature,
        "frozen_parameters": sum(int(p.numel()) for p in engine.frozen.values()),
    }
    if engine.no_forward_mode is not None:  # J v took two reverse passes (1.5-2.8x the time)
        info["no_forward_mode"] = engine.no_forward_mode
    if engine.kronecker is not None:
        info["uncovered_parameters"] = engine.kronecker.uncovered
        info["uncovered_layers"] = dict(sorted(engine.kronecker.left_out.items()))
        info["shared_weights"] = f"K-FAC-{APPROXIMATION}"
        if engine.kronecker.expanded:  # layers where reduce held almost none of the curvature
            info["expanded_layers"] = sorted(engine.kronecker.expanded)
        info["curvature_cached"] = engine.kronecker_cached
    return info


def curvature_notes(engine: InfluenceModel) -> list[str]:
    """Warnings a report carries about the engine: why its derivatives are float32 where
    a small model's are float64, why `auto` took the GGN, or the parameters K-FAC leaves
    out."""
    notes = [n for n in (engine.precision_note, engine.cost_note) if n]
    kron = engine.kronecker
    if kron is None or not kron.uncovered:
        return notes + ([engine.curvature_note] if engine.curvature_note else [])
    layers = ", ".join(f"{kind} {count}" for kind, count in sorted(kron.left_out.items()))
    return [
        *notes,
        f"{kron.uncovered} of {kron.size} parameters ({layers}) are outside the Linear, "
        f"Conv1d and Conv2d layers {engine.curvature} approximates: the patch leaves them "
        "unchanged (--curvature ggn covers every parameter)",
    ]
