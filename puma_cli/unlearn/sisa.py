"""SISA removal: retrain only the shards that held marked rows, from the first slice
that held one; the other shards stay bit-identical. See `puma_cli.models.shards`."""

from __future__ import annotations

from puma_cli.errors import PumaError
from puma_cli.models.architectures import ShardEnsemble
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.shards import SisaPlan, unlearn_sisa
from puma_cli.unlearn import RemovalRequest, RemovalResult, register


@register("sisa")
def sisa(request: RemovalRequest) -> RemovalResult:
    checkpoint = request.checkpoint
    if not isinstance(checkpoint.model, ShardEnsemble) or "sisa.shard" not in checkpoint.extra:
        raise PumaError(
            f"--method sisa retrains the shards of a SISA ensemble, and {checkpoint.path} is "
            "a single model: train one with `puma train --shards 5` (and --slices R), or use "
            "--method puma here"
        )
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    plan = SisaPlan.from_tensors(checkpoint.extra)
    model, new_plan, restarted = unlearn_sisa(
        checkpoint.model,
        plan,
        request.dataset,
        request.marked,
        recipe,
        request.device,
        request.progress,
    )
    emptied = [k for k in restarted if float(model.active[k]) == 0.0]
    warnings = []
    if emptied:
        warnings.append(
            f"shards {', '.join(map(str, emptied))} lost every row and no longer vote (their "
            "weights are back at their initial values); "
            f"{int(model.active.sum())} of {recipe.shards} shards remain"
        )
    return RemovalResult(
        model=model,
        method="sisa",
        parameters={
            "shards": recipe.shards,
            "slices": recipe.slices,
            "shards_retrained": len(restarted),
            "retrained_from_slice": {str(k): r for k, r in sorted(restarted.items())},
        },
        extra=new_plan.to_tensors(),
        warnings=warnings,
    )
