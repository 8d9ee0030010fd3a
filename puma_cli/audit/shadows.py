"""Shadow models for LiRA and Shokri: trained on random subsets of the attacker's pool.

They depend only on the data pool, the recipe, their number and the seed, not on the
attacked model, so their predictions are cached beside the checkpoint under a name
derived from those: an attack on the unlearned model reuses the original's shadows.
Each shadow records the features the attacks read: LiRA's logit-scaled confidence and
Shokri's sorted log-softmax, on every point of the pool.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from puma_cli import parallel
from puma_cli.data.dataset import Dataset
from puma_cli.io.cache import Cache, Check
from puma_cli.io.checkpoint import Checkpoint
from puma_cli.models.predict import predict_logits
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.shards import train_model
from puma_cli.models.training import Progress

MAX_SHADOWS = 1024  # LiRA's paper used up to 256; each shadow is one full training


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), computed stably as z_y - logsumexp(z_others)."""
    logits = logits.double()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def sorted_log_softmax(logits: torch.Tensor) -> np.ndarray:
    """(n, K) log-probabilities, largest first, floored at -30: Shokri's sorted softmax
    on a log scale, so that confidences of 0.999 and 0.99999 stay apart."""
    logp = torch.log_softmax(logits.double(), dim=1).clamp_min(-30.0)
    return torch.sort(logp, dim=1, descending=True).values.float().numpy()


@dataclass(frozen=True)
class ShadowSet:
    """inclusion (S, n) bool: point j in shadow s's training set; phi (S, n) each shadow's
    logit-scaled confidence on each point of the pool; sorted_logp (S, n, K) its sorted
    log-softmax (Shokri's features)."""

    inclusion: np.ndarray
    phi: np.ndarray
    sorted_logp: np.ndarray


def attack_pool(dataset: Dataset, other: Dataset) -> Dataset:
    """The attacker's data: every row of the training file, then the non-members. It does
    not depend on which rows a model still trains on, so a removal keeps the same shadows."""
    return replace(
        dataset,
        X=np.concatenate([dataset.X, other.X]),
        y=np.concatenate([dataset.y, other.y]),
        ids=np.concatenate([dataset.ids, np.array([f"nonmember:{i}" for i in other.ids])]),
    )


def pool_digest(pool: Dataset, key: object) -> str:
    """A short sha256 of the attacker's pool and a JSON-able key: the name of a cache of
    shadow models, which depend on nothing else."""
    digest = hashlib.sha256()
    for array in (pool.X, pool.y):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def shadow_cache_path(
    folder: Path, checkpoint: Checkpoint, pool: Dataset, count: int, size: int, seed: int
) -> Path:
    """Named after what the shadows depend on: the pool, the recipe, their number, the seed."""
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    key = pool_digest(pool, [recipe.to_dict(), count, size, seed])
    return folder / f"puma-shadows-{key}.safetensors"


def shadows_beside(
    model: Path,
    checkpoint: Checkpoint,
    pool: Dataset,
    train_rows: int,
    count: int,
    seed: int,
    device: torch.device | str,
    progress: Progress | None = None,
) -> tuple[ShadowSet, Cache]:
    """The shadow set of `train_shadows` for a model, its cache beside the model file (the
    caller commits it once its outputs are written), each shadow sized like the training
    set as first trained (recorded; else `train_rows`, the training file's), so that every
    model of a removal chain shares one set."""
    size = int(checkpoint.metrics.get("train", {}).get("n", train_rows))
    cache = Cache(shadow_cache_path(model.parent, checkpoint, pool, count, size, seed))
    return train_shadows(checkpoint, pool, count, size, seed, cache, device, progress), cache


def train_shadows(
    checkpoint: Checkpoint,
    pool: Dataset,
    count: int,
    size: int,
    seed: int,
    cache: Cache | None,
    device: torch.device | str,
    progress: Progress | None,
) -> ShadowSet:
    """Shadow models on random subsets of the pool, each of about `size` rows (the attacked
    model's training-set size: a shadow trained on less data is less confident, and every
    point would look like a member); their phi on every pool point. A cache (named by
    `shadow_cache_path`) is read when it fits, and a fresh set is staged in it."""
    n_classes = checkpoint.arch.n_classes
    if cache is not None:
        hit = cache.load({}, _check_shadows(count, len(pool), n_classes))
        if hit is not None:
            tensors = hit[0]
            return ShadowSet(
                tensors["inclusion"].numpy().astype(bool),
                tensors["phi"].numpy(),
                tensors["sorted_logp"].numpy(),
            )
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    # Every point is in the same number of shadows (LiRA's design, with the share set by
    # `size`), at least one and at most count - 1, so each has an IN and an OUT side.
    rng = np.random.default_rng(seed)
    inside = min(max(round(count * size / len(pool)), 1), count - 1)
    ranks = np.argsort(rng.random((count, len(pool))), axis=0)
    inclusion = ranks < inside
    # Under torchrun each process trains its block of the shadows; the others' rows stay
    # zero until the sum (every shadow's seed is its own, so the split changes nothing).
    phi = torch.zeros((count, len(pool)), dtype=torch.float64)
    sorted_logp = torch.zeros((count, len(pool), n_classes), dtype=torch.float32)
    labels = torch.as_tensor(pool.y)
    mine = parallel.block(count, "shadow models")
    for done, s in enumerate(mine, start=1):
        shadow = train_model(
            pool.subset(np.flatnonzero(inclusion[s])),
            replace(recipe, seed=recipe.seed + 1 + s),
            n_classes,
            device,
        )
        logits = predict_logits(shadow, pool.X)
        phi[s] = torch.from_numpy(logit_confidence(logits, labels))
        sorted_logp[s] = torch.from_numpy(sorted_log_softmax(logits))
        if progress is not None:
            progress(done, len(mine), 0.0)
    parallel.all_reduce(phi)
    parallel.all_reduce(sorted_logp)
    if cache is not None:
        tensors = {
            "inclusion": torch.from_numpy(inclusion.astype(np.uint8)),
            "phi": phi,
            "sorted_logp": sorted_logp,
        }
        cache.stage(tensors, {})
    return ShadowSet(inclusion, phi.numpy(), sorted_logp.numpy())


def _check_shadows(count: int, n: int, n_classes: int) -> Check:
    """A cached shadow set has one row per shadow and one column per pool point, finite
    confidences, and every point both in and out of some shadow."""

    def check(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
        shapes = {
            "inclusion": (torch.uint8, (count, n)),
            "phi": (torch.float64, (count, n)),
            "sorted_logp": (torch.float32, (count, n, n_classes)),
        }
        for name, (dtype, shape) in shapes.items():
            tensor = tensors.get(name)
            if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                return f"does not hold {name} as {shape} {dtype}: it is stale or damaged"
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"holds NaN or inf in {name}"
        inside = tensors["inclusion"].sum(dim=0)
        if (
            int(tensors["inclusion"].max()) > 1
            or int(inside.min()) < 1
            or int(inside.max()) >= count
        ):
            return "has points in no shadow or in all of them"
        return None

    return check
