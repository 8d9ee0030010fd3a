"""SISA training (Bourtoule et al. 2021): Sharded, Isolated, Sliced, Aggregated.

The rows trained on are split into K disjoint shards, one Classifier each; each shard's
rows are split into R slices. A shard trains in R stages: stage r runs ceil(epochs / R)
epochs, from a fresh Adam, on slices 0..r, starting where stage r - 1 ended. The state
after every stage but the last is kept, so removing a row of slice r retrains that
shard from stage r only. The ensemble averages the shards' softmax outputs.

A shard's standardisation is fitted on its first non-empty slice alone, so a row of a
later slice never touched it: retraining from a stored state is exact unlearning.
Untouched shards are left bit-identical.

The plan lives in the checkpoint as extra tensors: `sisa.shard` and `sisa.slice` (int16
per row of the training file, -1 for rows no shard trains on) and
`sisa.state.<k>.<r>.<name>` (shard k's state after stage r, for r < R - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from puma_cli.data.dataset import Dataset
from puma_cli.errors import PumaError
from puma_cli.models.architectures import Architecture, Classifier, Model, ShardEnsemble
from puma_cli.models.predict import as_tensor
from puma_cli.models.recipe import TrainRecipe, architecture_for, check_trainable
from puma_cli.models.training import Progress, fit, train_classifier

StateDict = dict[str, torch.Tensor]


@dataclass
class SisaPlan:
    """shard, slice: (n,) int per row of the data the ensemble was given (-1: not used).
    states[k][r]: shard k's state after stage r (r < slices - 1)."""

    shard: np.ndarray
    slice: np.ndarray
    states: dict[int, dict[int, StateDict]]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "sisa.shard": torch.from_numpy(self.shard.astype(np.int16)),
            "sisa.slice": torch.from_numpy(self.slice.astype(np.int16)),
        }
        for k, stages in self.states.items():
            for r, state in stages.items():
                for name, tensor in state.items():
                    out[f"sisa.state.{k}.{r}.{name}"] = tensor.detach().cpu().clone()
        return out

    def expanded(self, rows: np.ndarray, n: int) -> SisaPlan:
        """This plan over `rows` of an n-row file, as a plan over the file (-1 elsewhere)."""
        shard = np.full(n, -1, dtype=np.int64)
        piece = np.full(n, -1, dtype=np.int64)
        shard[rows], piece[rows] = self.shard, self.slice
        return SisaPlan(shard, piece, self.states)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SisaPlan:
        states: dict[int, dict[int, StateDict]] = {}
        for key, tensor in tensors.items():
            if key.startswith("sisa.state."):
                k, r, name = key[len("sisa.state.") :].split(".", 2)
                states.setdefault(int(k), {}).setdefault(int(r), {})[name] = tensor
        return cls(
            tensors["sisa.shard"].numpy().astype(np.int64),
            tensors["sisa.slice"].numpy().astype(np.int64),
            states,
        )


@dataclass
class SisaModel:
    model: ShardEnsemble
    plan: SisaPlan


def assign(
    n: int, shards: int, slices: int, seed: int, group: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Shard and slice of each of n rows: near-equal random shards and slices. Rows in
    `group` (the ordered scenario) go first, so they fill as few shards as they can."""
    if shards > n:
        raise PumaError(f"--shards {shards} is more than the {n} rows trained on; give fewer")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if group is not None and group.size:
        inside = np.isin(order, group)
        order = np.concatenate([order[inside], order[~inside]])
    shard = np.empty(n, dtype=np.int64)
    piece = np.empty(n, dtype=np.int64)
    for k, rows in enumerate(np.array_split(order, shards)):
        shard[rows] = k
        piece[rng.permutation(rows)] = np.arange(rows.size) * slices // rows.size
    return shard, piece


def stage_epochs(recipe: TrainRecipe) -> int:
    return math.ceil(recipe.epochs / recipe.slices)


def train_sisa(
    dataset: Dataset,
    recipe: TrainRecipe,
    n_classes: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    group: np.ndarray | None = None,
) -> SisaModel:
    """Train every shard of a fresh ensemble on `dataset` (every row is trained on)."""
    check_trainable(dataset, recipe)
    shard, piece = assign(len(dataset), recipe.shards, recipe.slices, recipe.seed, group)
    ensemble = ShardEnsemble(architecture_for(recipe, dataset, n_classes, recipe.shards))
    ensemble = ensemble.to(device)
    plan = SisaPlan(shard, piece, {})
    for k in range(recipe.shards):
        _train_shard(ensemble, plan, k, dataset, recipe, 0, device, progress)
    return SisaModel(ensemble.eval(), plan)


def unlearn_sisa(
    ensemble: ShardEnsemble,
    plan: SisaPlan,
    dataset: Dataset,
    remove: np.ndarray,
    recipe: TrainRecipe,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[ShardEnsemble, SisaPlan, dict[int, int]]:
    """Drop rows `remove` (positions in `dataset`) from their shards and retrain each
    affected shard from the first stage that saw one of them. Returns the new ensemble,
    its plan and {shard: stage retrained from}."""
    states = {k: dict(v) for k, v in plan.states.items()}
    plan = SisaPlan(plan.shard.copy(), plan.slice.copy(), states)
    new = ShardEnsemble(ensemble.arch).to(device)
    new.load_state_dict(ensemble.state_dict())
    hit = plan.shard[remove]
    if (hit < 0).any():
        raise PumaError("a row to remove belongs to no shard; the SISA plan is inconsistent")
    restarted: dict[int, int] = {}
    for k in np.unique(hit):
        k = int(k)
        first_stage = int(plan.slice[remove[hit == k]].min())
        plan.shard[remove[hit == k]] = -1
        plan.slice[remove[hit == k]] = -1
        restarted[k] = _train_shard(new, plan, k, dataset, recipe, first_stage, device, progress)
    return new.eval(), plan, restarted


def _train_shard(
    ensemble: ShardEnsemble,
    plan: SisaPlan,
    k: int,
    dataset: Dataset,
    recipe: TrainRecipe,
    first_stage: int,
    device: torch.device | str,
    progress: Progress | None,
) -> int:
    """(Re)train shard k from `first_stage` (from scratch when that stage is at or before
    the one its standardisation was fitted on). Returns the stage it started from."""
    rows_of = [np.flatnonzero((plan.shard == k) & (plan.slice == r)) for r in range(recipe.slices)]
    filled = [r for r in range(recipe.slices) if rows_of[r].size]
    member = ensemble.members[k]
    assert isinstance(member, Classifier)
    if not filled:  # every row of the shard is gone: it stops voting, and holds nothing
        ensemble.active[k] = 0.0
        plan.states.pop(k, None)
        member.load_state_dict(_untrained(member.arch, recipe, recipe.seed + 1000 * k))
        return 0
    base = filled[0]
    stages = plan.states.setdefault(k, {})
    if first_stage <= base or (first_stage - 1) not in stages:
        first_stage = base
        torch.manual_seed(recipe.seed + 1000 * k)
        fresh = Classifier(member.arch).to(device)
        first = dataset.subset(rows_of[base])
        if recipe.standardize:
            fresh.fit_standardisation(as_tensor(first.X, torch.float32, device))
        else:
            fresh.fix_standardisation(*recipe.fixed_inputs())
        member.load_state_dict(fresh.state_dict())
        # Every stored state goes: those from `base` on are trained again, and one before
        # it saw only slices that are now empty, so it holds removed rows and nothing else.
        stages.clear()
    else:
        member.load_state_dict(stages[first_stage - 1])
    for r in range(first_stage, recipe.slices):
        seen = np.concatenate(rows_of[: r + 1])
        if seen.size == 0:
            continue
        part = dataset.subset(seen)
        seed = recipe.seed + 1000 * k + r
        fit(member, part, recipe, stage_epochs(recipe), seed, device, _stage(progress, r, recipe))
        if r < recipe.slices - 1:
            stages[r] = {name: t.detach().clone() for name, t in member.state_dict().items()}
    member.eval()
    ensemble.active[k] = 1.0
    return first_stage


def _untrained(arch: Architecture, recipe: TrainRecipe, seed: int) -> dict[str, torch.Tensor]:
    """The state of a shard no row is left in: its initial weights (from the seed alone)
    and no standardisation fitted (the declared transform, where the recipe has one). Its
    trained weights and its rows' mean and std would keep in the file what the removal
    took out, though the shard no longer votes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = Classifier(arch)
    if not recipe.standardize:
        fresh.fix_standardisation(*recipe.fixed_inputs())
    return fresh.state_dict()


def _stage(progress: Progress | None, r: int, recipe: TrainRecipe) -> Progress | None:
    if progress is None:
        return None
    per_stage = stage_epochs(recipe)

    def report(epoch: int, _epochs: int, loss: float) -> None:
        progress(r * per_stage + epoch, per_stage * recipe.slices, loss)

    return report


def train_model(
    dataset: Dataset,
    recipe: TrainRecipe,
    n_classes: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Model:
    """What the recipe trains: one Classifier, or a SISA ensemble when it has shards
    (shadow models and `retrain` go through here)."""
    if recipe.shards > 1:
        return train_sisa(dataset, recipe, n_classes, device, progress).model
    return train_classifier(dataset, recipe, n_classes, device, progress)
