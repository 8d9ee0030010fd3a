"""`puma compare`: several removal methods on one request, side by side with retraining.

Every method runs through the same `remove` job (so each result is a checkpoint with its
provenance, written atomically to `--out-dir`), retraining always among them: it is the
reference. A second retraining with the recipe's seed + 1 gives the noise floor: how far
two retrained models are from each other, which no method can be asked to beat. Then,
per method: test accuracy, accuracy on the remaining and the marked rows, the marked rows'
loss, the mean KL divergence of the retrained model's softmax from the method's (on the
marked rows and on the test rows), the loss attack's AUC on the marked rows against the
test rows, LiRA's (with `--shadows K`, shared through the shadow cache), and the method's
time as a ratio to retraining's in this run. Every method runs cold (no cache of v or
of K-FAC factors is read or written), so that the times compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from puma_cli.audit.lira import lira_scores
from puma_cli.audit.loss import loss_attack
from puma_cli.audit.scoring import AttackReport, auc_score
from puma_cli.audit.shadows import (
    MAX_SHADOWS,
    attack_pool,
    logit_confidence,
    shadows_beside,
)
from puma_cli.audit.ulira import MIN_SHADOWS
from puma_cli.data.dataset import Dataset
from puma_cli.errors import SEED_MAX, DataError, PumaError, require_range
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs, write_atomically
from puma_cli.io.cache import Cache, commit_all
from puma_cli.io.ids import read_ids, rows_for_ids
from puma_cli.jobs.attack import ULIRA_METHODS, attack
from puma_cli.jobs.remove import remove
from puma_cli.models.predict import Phases, predict_logits
from puma_cli.quality.agreement import mean_kl
from puma_cli.quality.evaluation import evaluate
from puma_cli.unlearn import METHODS, RemovalOptions, RemovalRequest, applicable, get_method

DEFAULT_METHODS = (
    "puma",
    "influence",
    "finetune",
    "neggrad",
    "random-labels",
    "salun",
    "scrub",
    "ssd",
    "sisa",
    "amnesiac",
)
REFERENCE = "retrain"
ULIRA_SHADOWS = 16  # --audit without --shadows


@dataclass(frozen=True)
class MethodFigures:
    """One method's row: `original` is the model as given (no removal)."""

    method: str
    output: Path | None
    seconds: float | None
    time_ratio: float | None
    test_accuracy: float | None
    remaining_accuracy: float | None
    marked_accuracy: float | None
    marked_loss: float | None
    kl_marked: float | None
    kl_test: float | None
    loss_auc: float | None
    lira_auc: float | None
    cached: bool
    refused: str | None
    warnings: list[str]
    ulira_accuracy: float | None = None  # --audit: U-LiRA on this method (0.5: retraining)
    ulira_auc: float | None = None
    forgetting_score: float | None = None


@dataclass(frozen=True)
class CompareReport:
    methods: list[MethodFigures]
    reference: str
    retrain_seconds: float
    noise_floor_kl_marked: float
    noise_floor_kl_test: float | None
    n_marked: int
    n_remaining: int
    shadows: int
    audit_shadows: int
    out_dir: Path
    plot: Path | None
    seconds: float
    notes: list[str]


def default_out_dir(model: Path) -> Path:
    return model.with_name(f"{model.stem}.compare")


def parse_methods(text: str | None) -> list[str] | None:
    """'puma, finetune' -> ['puma', 'finetune']; None or empty: the default set."""
    if text is None or not text.strip():
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    get_method("puma")  # fill the registry
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise PumaError(
            f"--methods: {', '.join(map(repr, unknown))} is not a method; choose from "
            f"{', '.join(sorted(METHODS))}"
        )
    return list(dict.fromkeys(names))


def compare(
    model: Path,
    marked: Path,
    *,
    methods: list[str] | None = None,
    out_dir: Path | None = None,
    shadows: int = 0,
    plot: Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    phases: Phases | None = None,
    variants: dict[str, tuple[str, RemovalOptions]] | None = None,
    audit: bool = False,
) -> CompareReport:
    """Run each method on the marked ids, write its model to `out_dir`, and measure all.

    variants (the library's, for benchmarks): more rows, label -> (method, its options)."""
    started = time.perf_counter()
    require_range("--seed", seed, 0, SEED_MAX)
    if shadows:
        require_range("--shadows", shadows, MIN_SHADOWS if audit else 2, MAX_SHADOWS)
    audit_shadows = (shadows or ULIRA_SHADOWS) if audit else 0
    out_dir = out_dir or default_out_dir(model)
    _check_out_dir(out_dir, overwrite)
    checkpoint = ckpt.load_checkpoint(model, device)
    chosen, notes = _choose(methods, checkpoint)
    settings = {name: (name, RemovalOptions(seed=seed)) for name in chosen}
    settings.update(variants or {})
    settings[REFERENCE] = (REFERENCE, RemovalOptions(seed=seed))
    names = [REFERENCE, *[m for m in settings if m != REFERENCE]]
    outputs = {name: out_dir / f"{name}.safetensors" for name in names}
    if out_dir.exists():
        check_outputs([*outputs.values(), plot], [model, marked], overwrite)
    else:
        check_outputs([plot], [model, marked], overwrite)
    dataset = recorded.load_recorded_dataset(checkpoint, "train", phases)
    ids = read_ids(marked)
    if not ids:
        raise DataError(f"{marked} names no ids; give at least one id to remove")
    rows = rows_for_ids(dataset, ids, marked)
    test = recorded.load_recorded_or_none(checkpoint, "test", phases)
    if test is None:
        notes.append(f"{model} records no test file: test accuracy, KL on test and the attacks' "
                     "AUC are left out")  # fmt: skip
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    try:
        return _run(model, marked, checkpoint, dataset, rows, test, settings, names, outputs,
                    written, notes, shadows, audit_shadows, plot, seed, device, overwrite,
                    phases, started)  # fmt: skip
    except BaseException:
        # Nothing half written: a compare that fails takes back the models it wrote.
        for path in written:
            path.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _run(
    model: Path,
    marked: Path,
    checkpoint: ckpt.Checkpoint,
    dataset: Dataset,
    rows: np.ndarray,
    test: Dataset | None,
    settings: dict[str, tuple[str, RemovalOptions]],
    names: list[str],
    outputs: dict[str, Path],
    written: list[Path],
    notes: list[str],
    shadows: int,
    audit_shadows: int,
    plot: Path | None,
    seed: int,
    device: torch.device | str,
    overwrite: bool,
    phases: Phases | None,
    started: float,
) -> CompareReport:

    results: dict[str, tuple[float, bool, list[str]]] = {}
    refused: dict[str, str] = {}
    for i, name in enumerate(names):
        if phases is not None:
            phases("methods", i, len(names))
        try:
            method, options = settings[name]
            # Cold, every one: no method reads a cache another one left.
            done = remove(model, marked, outputs[name], method=method, options=options,
                          use_cache=False, device=device, overwrite=overwrite)  # fmt: skip
        except PumaError as exc:
            if name == REFERENCE:
                raise
            refused[name] = str(exc)
            continue
        written.append(outputs[name])
        results[name] = (done.seconds, done.cached, done.warnings)
    if phases is not None:
        phases("methods", len(names), len(names))

    roles = checkpoint.roles.copy()
    trained_marked = rows[roles[rows] == ckpt.ROLE_TRAINED]
    roles[trained_marked] = ckpt.ROLE_REMOVED
    remaining = dataset.subset(np.flatnonzero(roles == ckpt.ROLE_TRAINED))
    marked_set = dataset.subset(trained_marked)
    reference = ckpt.load_checkpoint(outputs[REFERENCE], device).model
    floor = _second_retrain(checkpoint, dataset, trained_marked, device, seed)
    lira = _LiRA(model, checkpoint, dataset, test, trained_marked, shadows, seed, device)

    def figures(name: str, net: torch.nn.Module, output: Path | None) -> MethodFigures:
        seconds, cached, warnings = results.get(name, (0.0, False, []))
        audited = _audit(output, marked, settings.get(name, ("", None))[0], audit_shadows,
                         seed, device)  # fmt: skip
        on_marked = evaluate(net, marked_set)
        return MethodFigures(
            method=name,
            output=output,
            seconds=seconds if output is not None else None,
            time_ratio=seconds / results[REFERENCE][0] if output is not None else None,
            test_accuracy=evaluate(net, test).accuracy if test is not None else None,
            remaining_accuracy=evaluate(net, remaining).accuracy,
            marked_accuracy=on_marked.accuracy,
            marked_loss=on_marked.loss,
            kl_marked=mean_kl(reference, net, marked_set.X),
            kl_test=mean_kl(reference, net, test.X) if test is not None else None,
            loss_auc=loss_attack(net, marked_set, test, remaining).auc
            if test is not None
            else None,
            lira_auc=lira.auc(net),
            cached=cached,
            refused=None,
            warnings=warnings,
            ulira_accuracy=audited.accuracy if audited else None,
            ulira_auc=audited.auc if audited else None,
            forgetting_score=audited.forgetting_score if audited else None,
        )

    rows_out = [figures("original", checkpoint.model, None)]
    for name in names:
        if name in refused:
            rows_out.append(_refused_row(name, refused[name]))
        else:
            net = reference if name == REFERENCE else ckpt.load_checkpoint(outputs[name]).model
            rows_out.append(figures(name, net, outputs[name]))
    report = CompareReport(
        methods=rows_out,
        reference=REFERENCE,
        retrain_seconds=results[REFERENCE][0],
        noise_floor_kl_marked=mean_kl(reference, floor, marked_set.X),
        noise_floor_kl_test=mean_kl(reference, floor, test.X) if test is not None else None,
        n_marked=int(trained_marked.size),
        n_remaining=len(remaining),
        shadows=shadows,
        audit_shadows=audit_shadows,
        out_dir=outputs[REFERENCE].parent,
        plot=plot,
        seconds=time.perf_counter() - started,
        notes=[*notes, *lira.notes],
    )
    if plot is not None:
        from puma_cli.plots import save_comparison

        drawn = [r for r in report.methods if r.refused is None]
        write_atomically(
            {plot: lambda tmp: save_comparison(
                tmp,
                [r.method for r in drawn],
                [r.marked_loss for r in drawn],
                [r.kl_marked for r in drawn],
                report.noise_floor_kl_marked,
            )},
            overwrite,
        )  # fmt: skip
    report.notes.extend(commit_all([lira.cache]))
    return report


def _audit(
    output: Path | None,
    marked: Path,
    method: str,
    shadows: int,
    seed: int,
    device: torch.device | str,
) -> AttackReport | None:
    """U-LiRA on one method's model (`attack --attack u-lira`), when --audit asks for it and
    the method can be repeated on shadow models."""
    if not shadows or output is None or method not in ULIRA_METHODS:
        return None
    return attack(output, marked, method="u-lira", shadows=shadows, seed=seed, device=device)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PumaError(f"--out-dir {out_dir} is a file; give a directory for the models")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PumaError(
            f"--out-dir {out_dir} already holds files; give a new or empty directory, or "
            "--overwrite to replace the models in it"
        )
    if not out_dir.parent.exists():
        raise PumaError(f"directory {out_dir.parent} does not exist; create it first")


def _choose(methods: list[str] | None, checkpoint: ckpt.Checkpoint) -> tuple[list[str], list[str]]:
    """The methods to run: those named (each must apply), or every default that applies."""
    if methods is not None:
        for name in methods:
            reason = applicable(name, checkpoint)
            if reason is not None:
                raise PumaError(f"--methods {name}: {reason}; or leave it out of --methods")
        return methods, []
    chosen = [m for m in DEFAULT_METHODS if applicable(m, checkpoint) is None]
    skipped = [m for m in DEFAULT_METHODS if m not in chosen]
    notes = [f"not applicable to this model, left out: {', '.join(skipped)}"] if skipped else []
    return chosen, notes


def _refused_row(name: str, reason: str) -> MethodFigures:
    return MethodFigures(name, None, None, None, None, None, None, None, None, None, None,
                         None, False, reason, [])  # fmt: skip


def _second_retrain(
    checkpoint: ckpt.Checkpoint,
    dataset: Dataset,
    marked: np.ndarray,
    device: torch.device | str,
    seed: int,
) -> torch.nn.Module:
    """Retraining again with the recipe's seed + 1: the seed-to-seed noise floor."""
    recipe = {**checkpoint.recipe, "seed": int(checkpoint.recipe.get("seed", 0)) + 1}
    other = replace(checkpoint, recipe=recipe)
    criterion = dataset.subset(marked)  # unused by retrain
    request = RemovalRequest(other, dataset, marked, criterion, RemovalOptions(seed=seed), device)
    return get_method(REFERENCE)(request).model


class _LiRA:
    """LiRA's offline scores for any model of this request, on shadows cached beside the
    original model (the attack `puma attack --attack lira --shadows K` would use)."""

    def __init__(
        self,
        model: Path,
        checkpoint: ckpt.Checkpoint,
        dataset: Dataset,
        test: Dataset | None,
        marked: np.ndarray,
        shadows: int,
        seed: int,
        device: torch.device | str,
    ) -> None:
        self.cache: Cache | None = None
        self.notes: list[str] = []
        self.shadow_set = None
        self.marked = marked
        if not shadows or test is None:
            if not shadows:
                self.notes.append("LiRA left out: give --shadows K (16 or more) to include it")
            return
        self.pool = attack_pool(dataset, test)
        self.n_train = len(dataset)
        self.shadow_set, self.cache = shadows_beside(
            model, checkpoint, self.pool, len(dataset), shadows, seed, device
        )

    def auc(self, net: torch.nn.Module) -> float | None:
        if self.shadow_set is None:
            return None
        logits = predict_logits(net, self.pool.X)
        phi = logit_confidence(logits, torch.as_tensor(self.pool.y))
        scores = lira_scores(self.shadow_set, phi, online=False)
        return auc_score(scores[self.marked], scores[self.n_train :])
