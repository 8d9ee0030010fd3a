"""The reference: re-run the recorded recipe on the rows that remain (a SISA ensemble is
retrained whole, with a fresh shard plan)."""

from __future__ import annotations

from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.shards import train_sisa
from puma_cli.models.training import train_classifier
from puma_cli.unlearn import RemovalRequest, RemovalResult, register


@register("retrain")
def retrain(request: RemovalRequest) -> RemovalResult:
    recipe = TrainRecipe.from_dict(request.checkpoint.recipe)
    rows = request.remaining_rows
    remaining = request.dataset.subset(rows)
    n_classes = request.checkpoint.arch.n_classes
    parameters = {"recipe": recipe.to_dict()}
    if recipe.shards > 1:
        sisa = train_sisa(remaining, recipe, n_classes, request.device, request.progress)
        extra = sisa.plan.expanded(rows, len(request.dataset)).to_tensors()
        return RemovalResult(sisa.model, "retrain", parameters, extra=extra)
    model = train_classifier(remaining, recipe, n_classes, request.device, request.progress)
    return RemovalResult(model=model, method="retrain", parameters=parameters)
